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
  Report            what a pass did
"""

from kvhoist.api import HoistedFunction, KvhoistWarning, hoist_invariants
from kvhoist.errors import KvhoistError, PassError, TraceError
from kvhoist.host import HostHoistedFunction
from kvhoist import targets
from kvhoist.passes.layout import repad_tokens
from kvhoist.passes.licm import licm
from kvhoist.passes.pipeline import optimize
from kvhoist.report import HoistedValue, Note, Report, Skipped

__version__ = "0.1.0"

__all__ = [
    "hoist_invariants", "HoistedFunction", "HostHoistedFunction", "licm", "optimize", "Report", "HoistedValue", "Skipped",
    "Note", "KvhoistError", "TraceError", "PassError", "KvhoistWarning", "repad_tokens", "targets",
]
