"""Desktops of one site replaying a boot profile over HTTP, as a mount does
(bench/scale.py runs one such process in each site's network namespace).

Each reader is a thread that stands for one desktop's mount: it asks its
cache server for the version's boot profile, hands the whole list to the
cache server's prefetch (POST /v1/prefetch, as icbdfs/profiles.py does),
then reads the blocks in the profile's order, each one checked against its
digest, timing every read. All readers start at the same wall-clock time
(`--start-at`), so the storm hits every site at once.

    python -m bench.scale_reader --cache URL --imi NAME --version V --readers N [--start-at EPOCH]

Prints one JSON document: per reader, the latencies in ms; errors; bytes.
The token comes from ICBD_TOKEN (a reader token), the CA from ICBD_CA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from icbdcore.clients import Credentials, session
from icbdcore.wire import PREFETCH_ROUTE, block_path, content_digest, profile_path


def replay(cache: str, imi: str, version: int, readers: int, start_at: float | None,
           credentials: Credentials, prefetch: bool = True) -> dict:
    latencies: list[list[float]] = [[] for _ in range(readers)]
    errors: list[str] = []
    sizes = [0] * readers
    ready = threading.Barrier(readers + 1)

    def one(index: int) -> None:
        with session(credentials) as http:
            try:
                ready.wait(timeout=120)
            except threading.BrokenBarrierError:
                return
            try:
                answer = http.get(cache + profile_path(imi, version), timeout=60)
                answer.raise_for_status()
                digests = list(dict.fromkeys(answer.json()["digests"]))
                if prefetch:
                    http.post(cache + PREFETCH_ROUTE, json={"blocks": digests, "imi": imi, "version": version},
                              timeout=60).raise_for_status()
                for digest in digests:
                    began = time.perf_counter()
                    block = http.get(cache + block_path(digest, imi, version), timeout=120)
                    if block.status_code != 200 or content_digest(block.content) != digest:
                        errors.append(f"{digest}: HTTP {block.status_code}")
                        return
                    latencies[index].append((time.perf_counter() - began) * 1000)
                    sizes[index] += len(block.content)
            except Exception as error:  # reported, not raised: the bench says what failed
                errors.append(f"reader {index}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(readers)]
    for thread in threads:
        thread.start()
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    began = time.perf_counter()
    ready.wait(timeout=120)
    for thread in threads:
        thread.join()
    return {"latencies_ms": [[round(x, 3) for x in xs] for xs in latencies], "errors": errors,
            "bytes": sum(sizes), "seconds": round(time.perf_counter() - began, 3)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_reader")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--imi", required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--readers", type=int, default=1)
    parser.add_argument("--start-at", type=float)
    parser.add_argument("--no-prefetch", action="store_true")
    args = parser.parse_args(argv)
    credentials = Credentials(os.environ["ICBD_TOKEN"], ca=os.environ.get("ICBD_CA"))
    doc = replay(args.cache.rstrip("/"), args.imi, args.version, args.readers, args.start_at, credentials,
                 prefetch=not args.no_prefetch)
    json.dump(doc, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
