"""The exceptions kvhoist raises (a module of their own so that every other module can import them)."""

from __future__ import annotations

import os


class KvhoistError(ValueError):
    """A usage error with a message that names the fix."""


class TraceError(KvhoistError):
    """The function could not be traced to a jaxpr."""


class KvhoistWarning(UserWarning):
    """The pipeline could not optimise a program; it runs unoptimised (as under ``jax.jit``)."""


class PassError(RuntimeError):
    """A rewrite produced an ill-formed jaxpr (a kvhoist bug): never returned to the user."""


def strict() -> bool:
    """``KVHOIST_STRICT=1``: internal failures raise instead of falling back to the unoptimised program."""
    return os.environ.get("KVHOIST_STRICT", "") not in ("", "0")
