"""`icbd key show`: the master's public key, as replicas, caches and mounts
take it with --master-key.

    icbd --master URL key show          # asks the master (GET /v1/key)
    icbd key show --data DIR            # on the master host: DATA/keys/master.pub, master running or not
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from icbdcore.errors import CliError
from icbdcore.layout import Layout
from icbdcore.signing import PublicKey, Untrusted
from icbdcore.wire import KEY_ROUTE

from .admin import _master


def show(args) -> int:
    key = _from_data(Path(args.data)) if args.data else _from_master(args)
    if args.json:
        json.dump({"key": key.text}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(key.text)
    return 0


def _from_master(args) -> PublicKey:
    doc = _master(args).call("GET", KEY_ROUTE, timeout=10)
    try:
        return PublicKey.parse(doc["key"])
    except (KeyError, TypeError, Untrusted) as error:
        raise CliError(f"the master at {args.master} answered {KEY_ROUTE} without a valid key ({error})") from None


def _from_data(data: Path) -> PublicKey:
    layout = Layout(data)
    path = layout.master_public_key
    try:
        return PublicKey.parse(path.read_text())
    except FileNotFoundError:
        if layout.btrfs_image.exists():
            raise CliError(f"{path} is missing: {layout.btrfs_image} is not mounted on {data}; start the master "
                           f"once, or ask it with --master URL") from None
        raise CliError(f"{path} is missing: is {data} a master's data folder, started at least once?") from None
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None
    except Untrusted as error:
        raise CliError(f"{path}: {error}") from None
