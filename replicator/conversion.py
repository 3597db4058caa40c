"""Converting a master's data folder of format 1 (made before the master
signed anything: xxh3-128 digests, unsigned records) to format 2, in place,
at start.

For each iMI, oldest version first: the version's manifest is built again
from its read-only snapshot, with BLAKE3 (build_manifest; a version whose
files and extents are its predecessor's reuses the digests just computed, so
only the first version of an iMI is read whole); its record keeps its number,
time and message and gets the new digest and a signature; a boot profile
recorded on it is translated block by block (old digest -> new, through the
old and the new manifest, whose chunks stand at the same places). Stream
spools are dropped: they are regenerated on demand and signed then.

Crash-safe and idempotent: per version, the manifest, then the profile, then
the record (the commit point) are replaced; a record already in format 2 is
left alone, so a start after a crash goes on where the last one stopped. The
format file, written by the caller once this returns, marks the end. Nothing
of format 1 is ever read as format 2: the formats differ in the manifest's
`format` and the digests' length, both checked.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import trio

from icbdcore.layout import Layout
from icbdcore.manifest import Manifest, VersionRecord
from icbdcore.records import read_json, write_bytes, write_json
from icbdcore.signing import SigningKey
from icbdcore.wire import DIGEST_HEX, InvalidInput, check_name

from .manifest_builder import Parent, build_manifest

log = logging.getLogger(__name__)


async def convert_format1(layout: Layout, key: SigningKey) -> None:
    started = time.monotonic()
    names = []
    for path in sorted(layout.meta.iterdir()) if layout.meta.is_dir() else []:
        try:
            names.append(check_name(path.name))
        except InvalidInput:
            continue
    log.warning("%s holds data of format 1 (xxh3 digests, unsigned records): converting %d iMIs in place; "
                "every version's manifest is built again, which reads its files once", layout.root, len(names))
    converted = 0
    for name in names:
        converted += await trio.to_thread.run_sync(_convert_imi, layout, key, name)
    shutil.rmtree(layout.streams, ignore_errors=True)
    layout.streams.mkdir(parents=True, exist_ok=True)
    log.warning("converted %d versions of %d iMIs to data format 2 in %.1f s", converted, len(names),
                time.monotonic() - started)


def _convert_imi(layout: Layout, key: SigningKey, name: str) -> int:
    versions = sorted(int(p.name.removesuffix(".json")) for p in layout.meta_dir(name).glob("*.json")
                      if p.name.removesuffix(".json").isdigit())
    parent: Parent | None = None
    converted = 0
    for version in versions:
        snapshot = layout.version_dir(name, version)
        doc = read_json(layout.version_record(name, version))
        if not isinstance(doc, dict) or not snapshot.is_dir():
            continue  # a record without its snapshot: the repository drops it at open
        if _is_format2(doc):
            manifest = Manifest.from_bytes(layout.manifest_file(name, version).read_bytes(), doc["digest"])
            parent = Parent(snapshot, manifest)
            continue
        chunk_size = doc.get("chunk_size", 1 << 20)
        manifest, _ = build_manifest(snapshot, chunk_size, parent)
        renamed = _renames(layout.manifest_file(name, version).read_bytes(), manifest)
        write_bytes(layout.manifest_file(name, version), manifest.canonical())
        _translate_profile(layout, key, name, version, renamed, manifest.digests())
        record = VersionRecord(version=version, digest=manifest.digest, bytes=manifest.bytes,
                               created=str(doc.get("created", "")), message=str(doc.get("message", "")),
                               chunk_size=chunk_size, imi=name)
        write_json(layout.version_record(name, version), key.sign(record.to_json()))
        log.info("converted %s version %d: manifest %s", name, version, manifest.digest)
        parent = Parent(snapshot, manifest)
        converted += 1
    return converted


def _is_format2(doc: dict) -> bool:
    digest = doc.get("digest")
    return isinstance(digest, str) and len(digest) == DIGEST_HEX and "signature" in doc


def _renames(old_raw: bytes, new: Manifest) -> dict[str, str]:
    """Old chunk digest -> new one, by position in the same files. The old
    manifest is read as plain JSON (never as a Manifest: its digests are of
    the other kind); one already rewritten maps each digest to itself."""
    try:
        old = json.loads(old_raw)
        entries = {e["path"]: e.get("chunks", []) for e in old["entries"] if e.get("type") == "file"}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    renamed = {}
    for entry in new.files():
        for old_digest, new_digest in zip(entries.get(entry.path, ()), entry.chunks, strict=False):
            if isinstance(old_digest, str):
                renamed[old_digest] = new_digest
    return renamed


def _translate_profile(layout: Layout, key: SigningKey, name: str, version: int, renamed: dict[str, str],
                       blocks: set[str]) -> None:
    path = layout.profile_file(name, version)
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("digests"), list):
        return
    digests = [renamed.get(d, d) for d in doc["digests"] if isinstance(d, str)]
    digests = [d for d in digests if d in blocks]
    if digests:
        write_json(path, key.sign({"imi": name, "recorded_on": version, "digests": digests}))
    else:
        path.unlink(missing_ok=True)
