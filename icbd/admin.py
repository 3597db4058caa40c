"""Admin commands of the `icbd` command line: they talk to the master (and,
for prefetch, to a site cache) over its HTTP API."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import requests
from tqdm import tqdm

from icbdcore import wire
from icbdcore.clients import Credentials, session, tls_failure
from icbdcore.errors import CliError
from icbdcore.wire import (
    IMIS_ROUTE,
    NODES_ROUTE,
    PREFETCH_ROUTE,
    SUBSCRIPTIONS_ROUTE,
    TOKENS_ROUTE,
    InvalidInput,
    check_name,
    parse_version,
    prefetch_job_path,
    publish_path,
    rollback_path,
    token_path,
)


class Api:
    """Blocking JSON calls to one icbd node, with one-line errors."""

    def __init__(self, url: str | None, credentials: Credentials, what: str = "master"):
        if not url:
            raise CliError(f"no {what} URL: give --{what} URL" + (" or set ICBD_MASTER" if what == "master" else ""))
        if not credentials.token:
            raise CliError("no token: give --token-file FILE, --token T or set ICBD_TOKEN")
        self.url = url.rstrip("/")
        self.what = what
        self.session = session(credentials)

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 3600) -> dict:
        try:
            response = self.session.request(method, f"{self.url}{path}", json=body, timeout=timeout)
        except requests.exceptions.SSLError as error:
            raise CliError(f"no TLS connection to the {self.what} at {self.url}: "
                           f"{tls_failure(error) or 'handshake failed'}") from None
        except requests.ConnectionError:
            raise CliError(f"cannot reach the {self.what} at {self.url}: is it running?") from None
        except requests.Timeout:
            raise CliError(f"the {self.what} at {self.url} did not answer in time") from None
        try:
            doc = response.json()
        except ValueError:
            doc = {}
        if response.status_code >= 400:
            message = doc.get("error") if isinstance(doc, dict) else None
            raise CliError(message or f"{self.what} answered HTTP {response.status_code}")
        return doc


def _credentials(args) -> Credentials:
    return Credentials(args.token, ca=args.ca)


def _master(args) -> Api:
    return Api(args.master, _credentials(args))


def _name(text: str) -> str:
    try:
        return check_name(text)
    except InvalidInput as error:
        raise CliError(str(error)) from None


def _version(text: str) -> int:
    try:
        return parse_version(text)
    except InvalidInput as error:
        raise CliError(str(error)) from None


def _print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _progress(api: Api, name: str, phase: str) -> dict | None:
    """What the master says of `phase` ("updating", "publishing") of NAME under
    way, or None; a failed poll only skips one refresh of the bar."""
    try:
        return api.call("GET", wire.imi_path(name), timeout=5).get(phase)
    except CliError:
        return None


def _interactive() -> bool:
    return sys.stdout.isatty()


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _in_background(work, on_wait) -> dict:
    """Run the blocking `work()` while `on_wait()` is called every 0.3 s."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.3)
        if thread.is_alive():
            on_wait()
    if "error" in result:
        raise result["error"]
    return result["value"]


# --- imi --------------------------------------------------------------------------


def imi_create(args) -> int:
    api = _master(args)
    name = _name(args.name)
    source = os.path.abspath(args.source)
    with tqdm(desc=f"creating {name}", unit="s", disable=not _interactive(), bar_format="{desc}: {elapsed}") as bar:
        doc = _in_background(lambda: api.call("POST", IMIS_ROUTE, {"name": name, "from": source}), bar.refresh)
    if args.json:
        _print_json(doc)
    else:
        print(f"created {name}; its working copy on the master is {doc['path']}")
    return 0


def imi_update(args) -> int:
    api = _master(args)
    name = _name(args.name)
    source = os.path.abspath(args.source)
    bar = tqdm(desc=f"updating {name}", total=100, unit="%", disable=not _interactive(),
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")

    def show_progress() -> None:
        progress = _progress(api, name, "updating")
        if progress:
            bar.n = progress["percent"]
            bar.refresh()

    try:
        doc = _in_background(lambda: api.call("POST", wire.update_path(name), {"from": source}), show_progress)
        bar.n = 100
    finally:
        bar.close()
    if args.json:
        _print_json(doc)
    else:
        print(f"updated the working copy of {name} from {source}; publish it with `icbd imi publish {name}`")
    return 0


def imi_publish(args) -> int:
    api = _master(args)
    name = _name(args.name)
    bar = tqdm(desc=f"publishing {name}", unit="B", unit_scale=True, disable=not _interactive())

    def show_progress() -> None:
        progress = _progress(api, name, "publishing")
        if progress:
            bar.total = progress["bytes_total"]
            bar.n = progress["bytes_done"]
            bar.refresh()

    try:
        record = _in_background(
            lambda: api.call("POST", publish_path(name), {"message": args.message}), show_progress
        )
        if bar.total:
            bar.n = bar.total
    finally:
        bar.close()
    if args.json:
        _print_json(record)
    else:
        print(f"published {name} version {record['version']} ({_bytes(record['bytes'])}, digest {record['digest']})")
    return 0


def imi_list(args) -> int:
    doc = _master(args).call("GET", IMIS_ROUTE)
    if args.json:
        _print_json(doc)
        return 0
    rows = [[i["name"], str(i["latest"] or "-"), _ranges([v["version"] for v in i["versions"]]),
             _bytes(i["versions"][-1]["bytes"]) if i["versions"] else "-"] for i in doc["imis"]]
    print(_table(rows, ["NAME", "LATEST", "VERSIONS", "SIZE"]) if rows else "no iMIs yet (icbd imi create NAME --from PATH)")
    return 0


def imi_versions(args) -> int:
    name = _name(args.name)
    doc = _master(args).call("GET", wire.imi_path(name))
    shaped = {"name": doc["name"], "latest": doc["latest"], "versions": doc["versions"]}
    if args.json:
        _print_json(shaped)
        return 0
    rows = [["*" if v["version"] == doc["latest"] else "", str(v["version"]), v["created"], _bytes(v["bytes"]),
             v["digest"], v["message"]] for v in doc["versions"]]
    print(_table(rows, ["", "VERSION", "CREATED", "SIZE", "DIGEST", "MESSAGE"]) if rows else f"{name} has no versions yet")
    return 0


def imi_path(args) -> int:
    name = _name(args.name)
    doc = _master(args).call("GET", wire.imi_path(name))
    if args.json:
        _print_json({"name": name, "path": doc["path"]})
    else:
        print(doc["path"])
    return 0


def imi_rollback(args) -> int:
    name = _name(args.name)
    version = _version(args.version)
    doc = _master(args).call("POST", rollback_path(name), {"version": version})
    if args.json:
        _print_json({"name": name, "latest": doc["latest"], "versions": doc["versions"]})
    else:
        print(f"{name}: latest is now version {doc['latest']}")
    return 0


def imi_delete(args) -> int:
    name = _name(args.name)
    doc = _master(args).call("DELETE", wire.imi_path(name))
    if args.json:
        _print_json(doc)
    else:
        print(f"deleted {name}")
    return 0


def subscribe(args) -> int:
    return _subscription(args, "POST")


def unsubscribe(args) -> int:
    return _subscription(args, "DELETE")


def _subscription(args, method: str) -> int:
    name = _name(args.name)
    doc = _master(args).call(method, SUBSCRIPTIONS_ROUTE, {"imi": name, "node": args.node})
    if args.json:
        _print_json(doc)
    else:
        print(f"{args.node} {'subscribed to' if method == 'POST' else 'unsubscribed from'} {name}")
    return 0


# --- tokens -------------------------------------------------------------------------


def token_create(args) -> int:
    body = {"role": args.role}
    if args.name:
        body["name"] = args.name
    doc = _master(args).call("POST", TOKENS_ROUTE, body)
    if args.json:
        _print_json(doc)
    else:
        print(doc["token"])  # alone on stdout, for `> FILE`; the name goes to stderr
        print(f"issued {doc['role']} token {doc['name']} (shown this once; keep it in a file of mode 0600)",
              file=sys.stderr)
    return 0


def token_list(args) -> int:
    doc = _master(args).call("GET", TOKENS_ROUTE)
    if args.json:
        _print_json(doc)
        return 0
    rows = [[t["name"], t["role"], "(the master's own)" if t.get("builtin") else t["created"]] for t in doc["tokens"]]
    print(_table(rows, ["NAME", "ROLE", "CREATED"]))
    return 0


def token_revoke(args) -> int:
    doc = _master(args).call("DELETE", token_path(args.name))
    if args.json:
        _print_json(doc)
    else:
        print(f"revoked {doc['revoked']}: every node refuses it from its next heartbeat")
    return 0


# --- status -------------------------------------------------------------------------


def status(args) -> int:
    api = _master(args)
    if not args.watch:
        doc = api.call("GET", NODES_ROUTE, timeout=10)
        if args.json:
            _print_json(doc)
        else:
            print(render_status(doc))
        return 0
    while True:
        try:
            doc = api.call("GET", NODES_ROUTE, timeout=10)
            text = json.dumps(doc) if args.json else render_status(doc, bars=True)
        except CliError as error:
            text = f"icbd: {error}"
        if _interactive() and not args.json:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(text, flush=True)
        time.sleep(args.interval)


def render_status(doc: dict, bars: bool = False) -> str:
    nodes = doc["nodes"]
    master = next((n for n in nodes if n["role"] == "master"), None)
    newest = {name: max(vs) for name, vs in (master or {}).get("versions", {}).items() if vs}
    rows = []
    for node in nodes:
        held = node.get("versions", {})
        cells = []
        for name in sorted(set(held) | set(node.get("subscriptions", []))):
            versions = held.get(name, [])
            lag = newest.get(name, 0) - max(versions, default=0)
            cells.append(f"{name}:{_ranges(versions) or '-'}" + (f" ({lag} behind)" if lag > 0 and node["role"] != "master" else ""))
        rows.append([node["id"], node["role"], node["site"], node["state"], ", ".join(cells) or "-", node["url"]])
    lines = [_table(rows, ["NODE", "ROLE", "SITE", "STATE", "VERSIONS", "URL"])]
    transfers = [(n["id"], t) for n in nodes if n["role"] != "master" for t in n.get("transfers", [])]
    if transfers:
        lines.append("")
        lines.append("TRANSFERS")
        for node_id, t in transfers[-12:]:
            origin = f"delta from {t['parent']}" if t.get("parent") else "full"
            line = f"{node_id:<14} {t['imi']} v{t['version']} ({origin}) {t['state']}"
            if bars and t["state"] == "running":
                line += "  " + tqdm.format_meter(t["bytes"], None, t["seconds"], unit="B", unit_scale=True)
            else:
                rate = t["bytes"] / t["seconds"] if t.get("seconds") else 0
                line += f"  {_bytes(t['bytes'])} in {t['seconds']:.1f}s ({_bytes(rate)}/s)"
            if t.get("error"):
                line += f"  error: {t['error']}"
            lines.append(line)
    return "\n".join(lines)


# --- prefetch -----------------------------------------------------------------------


def prefetch(args) -> int:
    name, _, version_text = args.target.partition("@")
    name = _name(name)
    body: dict = {"imi": name, "profile": bool(args.profile)}
    if version_text:
        body["version"] = _version(version_text)
    cache = Api(args.cache, _credentials(args), what="cache")
    job = cache.call("POST", PREFETCH_ROUTE, body)
    bar = tqdm(desc=f"pre-staging {name}", total=job.get("blocks"), unit="block", disable=not _interactive())
    try:
        while job["state"] == "running":
            time.sleep(0.5)
            job = cache.call("GET", prefetch_job_path(job["id"]))
            bar.total = job.get("blocks")
            bar.n = job.get("done", 0)
            bar.refresh()
    finally:
        bar.close()
    if args.json:
        _print_json(job)
    elif job["state"] != "done":
        raise CliError(f"pre-staging {name} failed: {job.get('error', job['state'])}")
    else:
        print(f"{name} v{job['version']}: {job['done']} blocks staged at {args.cache} "
              f"({job.get('fetched', 0)} fetched, the rest were there)")
    return 0 if job["state"] == "done" else 1


# --- formatting -----------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _ranges(versions: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3,5'."""
    runs: list[list[int]] = []
    for v in sorted(versions):
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
