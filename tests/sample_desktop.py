"""Building the sample desktop iMI (bench/images/desktop.py) in tests, or
skipping with the reason when this machine or this user cannot.

The build needs the Debian packages in its package cache
(/var/cache/icbd/debs/small-desktop, or <repo>/build/debs/small-desktop where
that cannot be written; filled by `apt-get download` on first use). A run as root fills it; another
user can build from it once it is filled, but cannot fill it (the checkout
is root's): its tests are skipped until then, saying so.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from bench.images import desktop
from bench.images.desktop import ImageBuildError, build_desktop_tree


def build_or_skip(out: Path, **kwargs) -> Path:
    """build_desktop_tree(out, **kwargs), or skip the test if the packages cannot be had here."""
    try:
        return build_desktop_tree(out, **kwargs)
    except ImageBuildError as error:
        if "apt-get download" in str(error):
            pytest.skip(f"cannot download the Debian packages: {error}")
        raise
    except PermissionError as error:
        cache = Path(kwargs.get("cache_dir") or desktop.default_cache_dir())
        if error.errno == errno.EACCES and error.filename and Path(error.filename).is_relative_to(cache.parent):
            pytest.skip(f"the Debian package cache {cache} is not filled yet and this user cannot fill it: "
                        f"run the tests (or python -m bench.images.desktop) once as root ({error})")
        raise
