"""kvhoist: loop-invariant hoisting over JAX jaxprs.

Diffusion samplers run a transformer many times; cross-attention projects the same text/image
embeddings to keys and values at every step. kvhoist traces a sampler to a jaxpr, finds what does
not depend on the loop, and moves it out — including out of nested layer scans (fission) and expert
``cond``s (speculation), which XLA's own loop-invariant code motion never touches.

Public API:
  hoist_invariants  decorator: trace, rewrite, compile, cache per signature; with
                    invariant_argnums/argnames, a host-loop step split into a cached prologue
  licm              the hoisting pass on a ClosedJaxpr
  optimize          the whole pipeline on a ClosedJaxpr
  repad_tokens      the layout pass: re-pad masked token axes to a target's MXU tile
  targets           TPU generations and their tiles (get_target, detect_target)
  attention         one attention primitive (kvhoist_attention), lowered to XLA math or splash attention
  Report            what a pass did
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

# Nothing below imports jax until a name is used (PEP 562), so `kvhoist --help` and
# `import kvhoist.tools.cli` stay fast; `kvhoist.hoist_invariants` etc. import their module on first access.
from kvhoist.errors import KvhoistError, PassError, TraceError

#: public name -> the module that defines it (a submodule itself when the name is that module's).
_LAZY = {
    "hoist_invariants": "kvhoist.api", "HoistedFunction": "kvhoist.api", "KvhoistWarning": "kvhoist.api",
    "HostHoistedFunction": "kvhoist.host", "targets": "kvhoist.targets", "repad_tokens": "kvhoist.passes.layout",
    "licm": "kvhoist.passes.licm", "optimize": "kvhoist.passes.pipeline", "HoistedValue": "kvhoist.report",
    "Note": "kvhoist.report", "Report": "kvhoist.report", "Skipped": "kvhoist.report",
    "attention": "kvhoist.kernels",
}

if TYPE_CHECKING:
    from kvhoist import targets
    from kvhoist.api import HoistedFunction, KvhoistWarning, hoist_invariants
    from kvhoist.host import HostHoistedFunction
    from kvhoist.kernels import attention
    from kvhoist.passes.layout import repad_tokens
    from kvhoist.passes.licm import licm
    from kvhoist.passes.pipeline import optimize
    from kvhoist.report import HoistedValue, Note, Report, Skipped


def _is_submodule(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # `import kvhoist; kvhoist.compat` worked when the package imported everything eagerly: keep it working
        module = f"kvhoist.{name}"
        if name.startswith("_") or (module not in sys.modules and not _is_submodule(module)):
            raise AttributeError(f"module 'kvhoist' has no attribute {name!r}")
        try:
            return importlib.import_module(module)
        except ImportError as err:  # hasattr() / getattr(..., default) expect an AttributeError
            raise AttributeError(f"module 'kvhoist' has no attribute {name!r} ({err})") from err
    mod = importlib.import_module(module)
    value = mod if module == f"kvhoist.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "hoist_invariants", "HoistedFunction", "HostHoistedFunction", "licm", "optimize", "Report", "HoistedValue", "Skipped",
    "Note", "KvhoistError", "TraceError", "PassError", "KvhoistWarning", "repad_tokens", "targets",
    "attention",
]
