"""Where the master may copy an iMI from: the folders it was started with
(`icbd master --source-root DIR`, repeatable).

`imi create --from PATH` copies PATH, as root, into an iMI that every reader
can then read back block by block. Without this check any admin token, or
anything that tricked an admin, could publish /etc (and its shadow file) or
the master's own signing key. PATH is resolved (symlinks followed) and must
lie below a source root; it may not hold, or lie inside, the master's data
folder; with no source root at all, every create is refused.
"""

from __future__ import annotations

from pathlib import Path

from icbdcore.errors import CliError
from icbdcore.wire import Refused


class SourceRoots:
    def __init__(self, roots: list[Path], data: Path):
        self.roots = roots
        self.data = data.resolve()

    @classmethod
    def from_options(cls, given: list[str], data: Path) -> SourceRoots:
        roots = []
        for text in given:
            root = Path(text)
            if not root.is_absolute():
                raise CliError(f"--source-root {text}: give an absolute path")
            if not root.is_dir():
                raise CliError(f"--source-root {text}: no such folder")
            roots.append(root.resolve())
        return cls(roots, data)

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def check(self, given: str) -> Path:
        """The resolved path to copy from, or Refused (400, 403) saying why not."""
        if not self.roots:
            raise Refused(403, "this master takes no sources: start it with --source-root DIR "
                          "(repeatable) to allow `imi create --from` below DIR")
        path = Path(given)
        if not path.is_absolute():
            raise Refused(400, f"--from must be an absolute path on the master host, not {given}")
        try:
            resolved = path.resolve()  # symlinks followed, as cp will follow them
        except (OSError, RuntimeError) as error:
            raise Refused(400, f"cannot resolve {given} on the master host: {error}") from None
        if not any(resolved.is_relative_to(root) for root in self.roots):
            shown = f" ({resolved})" if str(resolved) != given else ""
            raise Refused(403, f"{given}{shown} is not below a source root of this master: {self.describe()}")
        if resolved.is_relative_to(self.data) or self.data.is_relative_to(resolved):
            raise Refused(403, f"{given} is or holds the master's data folder {self.data}")
        return resolved
