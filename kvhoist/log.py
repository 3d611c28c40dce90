"""The ``kvhoist`` logger, and ``KVHOIST_LOG``: kvhoist's log lines without anyone else's.

``logging.basicConfig(level=logging.DEBUG)`` turns on every library's DEBUG lines (jax's alone are hundreds
per compile). To see kvhoist's only, give its logger a handler of its own:

    import logging
    log = logging.getLogger("kvhoist")
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.DEBUG)

or set ``KVHOIST_LOG`` before the program starts, like XLA's ``TF_CPP_MIN_LOG_LEVEL`` / ``XLA_FLAGS``:
``KVHOIST_LOG=info`` (trace, rewrite and compile times), ``KVHOIST_LOG=debug`` (also one line per hoisted
value); ``off`` (or unset) changes nothing. The handler writes ``kvhoist LEVEL message`` lines to stderr and
the logger stops propagating, so a root handler does not print them twice. Any other value is a
``UserWarning`` naming the valid ones, and is ignored.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["ENV", "LEVELS", "logger", "configure_from_env"]

ENV = "KVHOIST_LOG"
#: KVHOIST_LOG values -> logging levels (None: leave the logger as it is).
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "off": None, "": None}

#: The logger of the whole package (silent until configured).
logger = logging.getLogger("kvhoist")


class _EnvHandler(logging.StreamHandler):
    """The handler :func:`configure_from_env` adds (at most one; it writes to the current ``sys.stderr``)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    @property
    def stream(self):  # follow sys.stderr (pytest's capture, redirect_stderr) instead of the one at import
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_from_env(environ: dict | None = None) -> int | None:
    """Apply ``KVHOIST_LOG`` to :data:`logger`; returns the level set, or None when the variable asks nothing.

    Called once when :mod:`kvhoist.api` is imported; call again after changing the variable."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if value not in LEVELS:
        warnings.warn(f"{ENV}={value!r}: use one of debug, info, warning, off; ignored", UserWarning, stacklevel=2)
        return None
    level = LEVELS[value]
    if level is None:
        return None
    if not any(isinstance(h, _EnvHandler) for h in logger.handlers):
        logger.addHandler(_EnvHandler())
    logger.setLevel(level)
    logger.propagate = False
    return level
