"""The master's Ed25519 key: what it signs, and the check every other tier
makes before it believes a catalogue, a version record, a stream record or a
boot profile.

A signed document is a JSON object with one more member, "signature": the
base64 Ed25519 signature of the canonical JSON of the object without it
(keys sorted, no spaces, ASCII). Extra members are fine; a changed one breaks
the signature. Only the master holds the private key (DATA/keys/, mode 0600,
never sent); replicas, caches and mounts hold the public key, given by the
admin (`--master-key`) or taken at first contact and pinned (trust on first
use, as SSH's known_hosts does).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_PREFIX = "ed25519:"
SIGNATURE = "signature"


class Untrusted(ValueError):
    """A document that is not signed by the master's key, or not well formed."""


def canonical(doc: dict) -> bytes:
    """The bytes a signature covers: `doc` without its signature, canonical JSON."""
    body = {k: v for k, v in doc.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class PublicKey:
    def __init__(self, key: Ed25519PublicKey):
        self._key = key
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.text = KEY_PREFIX + base64.b64encode(raw).decode()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"PublicKey({self.text!r})"

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """A key as `icbd key show` prints it ("ed25519:BASE64")."""
        text = text.strip()
        if not text.startswith(KEY_PREFIX):
            raise Untrusted(f"not an icbd master key (expected {KEY_PREFIX}BASE64): {text[:40]!r}")
        try:
            raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except ValueError:
            raise Untrusted(f"not a valid Ed25519 public key: {text[:60]!r}") from None

    @classmethod
    def from_argument(cls, value: str) -> PublicKey:
        """`--master-key KEY|FILE`: the key itself, or a file holding it."""
        if value.strip().startswith(KEY_PREFIX):
            return cls.parse(value)
        try:
            return cls.parse(Path(value).read_text())
        except OSError as error:
            raise Untrusted(f"--master-key {value}: neither a key ({KEY_PREFIX}...) nor a readable file "
                            f"({error.strerror})") from None

    def verify(self, doc: object, what: str = "document") -> dict:
        """`doc` if the master signed it; raises Untrusted otherwise."""
        if not isinstance(doc, dict):
            raise Untrusted(f"the {what} is not a JSON object")
        signature = doc.get(SIGNATURE)
        if not isinstance(signature, str):
            raise Untrusted(f"the {what} is not signed")
        try:
            self._key.verify(base64.b64decode(signature, validate=True), canonical(doc))
        except (InvalidSignature, ValueError):
            raise Untrusted(f"the {what} is not signed by the master's key") from None
        return doc


class SigningKey:
    """The master's private key, created at first start."""

    PRIVATE = "master.key"
    PUBLIC = "master.pub"

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.public = PublicKey(key.public_key())

    @classmethod
    def load_or_create(cls, folder: Path) -> SigningKey:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        private = folder / cls.PRIVATE
        try:
            key = serialization.load_pem_private_key(private.read_bytes(), password=None)
        except FileNotFoundError:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            tmp = folder / f".{cls.PRIVATE}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, private)
        if not isinstance(key, Ed25519PrivateKey):
            raise Untrusted(f"{private} is not an Ed25519 private key")
        if private.stat().st_mode & 0o077:
            os.chmod(private, 0o600)
        signing = cls(key)
        (folder / cls.PUBLIC).write_text(signing.public.text + "\n")
        return signing

    def sign(self, doc: dict) -> dict:
        """`doc` with its signature (any old one replaced)."""
        signature = self._key.sign(canonical(doc))
        return {**{k: v for k, v in doc.items() if k != SIGNATURE}, SIGNATURE: base64.b64encode(signature).decode()}
