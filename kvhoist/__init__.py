"""kvhoist: loop-invariant hoisting over JAX jaxprs.

Diffusion samplers run a transformer many times; cross-attention projects the same text/image
embeddings to keys and values at every step. kvhoist traces a sampler to a jaxpr, finds what does
not depend on the loop, and moves it out — including out of nested layer scans and expert conds,
which XLA's own loop-invariant code motion never touches.
"""

__version__ = "0.1.0"
