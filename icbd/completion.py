"""`icbd completion SHELL`: a completion script for bash, zsh or tcsh, made
by shtab from the command line's own parser, so it completes every command
and option there is (make install puts the bash one where bash-completion
finds it)."""

from __future__ import annotations

import shtab


def script(shell: str) -> str:
    from .cli import build_parser

    return shtab.complete(build_parser(), shell=shell)


def main(args) -> int:
    print(script(args.shell), end="")
    return 0
