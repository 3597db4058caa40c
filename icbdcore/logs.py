"""The one logging set-up of every icbd process: one event per line, to stderr
or to a file rotated at 10 MiB (three kept)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOG_BYTES = 10 << 20
LOG_BACKUPS = 3
FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
# Libraries that log every request at INFO.
NOISY = ("httpx", "httpcore", "hypercorn.access", "urllib3", "pyfuse3")


def setup_logging(log_file: str | Path | None, verbose: bool) -> None:
    """Log to `log_file` (rotated) if given, else to stderr."""
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
