"""The one logging set-up of every icbd process: one event per line, to
stderr or to a file rotated at 10 MiB (three kept).

- **One event per line.** A message or traceback that spans lines is
  written on one, its line breaks as `\\n`, so a log line is an event and
  `grep` or journald never splits one.
- **Under systemd** (stderr is the journal stream systemd names in
  JOURNAL_STREAM) a line carries no time and no pid of its own, which
  journald records, and starts with the syslog priority (`<4>`), which
  journald takes as the entry's priority and strips.
- **Request ids.** A transfer or a block fetch carries one id across the
  nodes it involves (the X-Request-Id header, made at the first hop and
  passed on: see icbdcore/http.py and the clients). While a node works on
  one, every line it logs ends with ` rid=ID`, so one `journalctl | grep
  rid=ID` on each host follows it.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import re
import secrets
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

LOG_BYTES = 10 << 20
LOG_BACKUPS = 3
FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
# journald stamps each entry with the time and the pid itself.
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Libraries that log every request at INFO.
NOISY = ("httpx", "httpcore", "hypercorn.access", "urllib3", "pyfuse3")
# logging levels as syslog priorities (sd-daemon(3): "<3>" at the start of a line)
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

# The id of the transfer or block fetch the current task works on, if any.
_request_id: ContextVar[str | None] = ContextVar("icbd_request_id", default=None)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


def new_request_id() -> str:
    """A fresh id for a transfer or a block fetch (64 random bits, hex)."""
    return secrets.token_hex(8)


def valid_request_id(text: object) -> str | None:
    """`text` if it may be taken as a request id (from a header), else None:
    1-64 of A-Z a-z 0-9 . _ -, so a caller cannot forge log lines with it."""
    return text if isinstance(text, str) and _REQUEST_ID.match(text) else None


def current_request_id() -> str | None:
    return _request_id.get()


@contextlib.contextmanager
def request_id(rid: str | None) -> Iterator[str | None]:
    """Log with ` rid=RID` while in the block (None: no id)."""
    token = _request_id.set(rid)
    try:
        yield rid
    finally:
        _request_id.reset(token)


class OneLineFormatter(logging.Formatter):
    """A record as one line: the request id appended, line breaks escaped,
    and, for the journal, the syslog priority in front."""

    def __init__(self, fmt: str, journal: bool = False):
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "rid", None) or _request_id.get()
        if rid:
            text += f" rid={rid}"
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        if self.journal:
            text = f"<{PRIORITIES.get(record.levelno, 6)}>{text}"
        return text


def stderr_is_journal() -> bool:
    """Whether stderr is the stream systemd connected to journald (the
    device and inode in JOURNAL_STREAM are stderr's, systemd.exec(5))."""
    named = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = named.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def setup_logging(log_file: str | Path | None, verbose: bool) -> None:
    """Log to `log_file` (rotated) if given, else to stderr."""
    journal = False
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        journal = stderr_is_journal()
    handler.setFormatter(OneLineFormatter(JOURNAL_FORMAT if journal else FORMAT, journal=journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
