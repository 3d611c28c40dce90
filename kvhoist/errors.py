"""The exceptions kvhoist raises (a module of their own so that every other module can import them)."""

from __future__ import annotations


class KvhoistError(ValueError):
    """A usage error with a message that names the fix."""


class TraceError(KvhoistError):
    """The function could not be traced to a jaxpr."""


class PassError(RuntimeError):
    """A rewrite produced an ill-formed jaxpr (a kvhoist bug): never returned to the user."""
