"""The benchmarks: measurements, not tests (nothing here asserts a speed). One benchmark per module:

* :mod:`kvhoist.bench.samplers`: ``kvhoist bench`` / ``python -m kvhoist.bench`` — plain ``jax.jit`` vs the
  hand-written K/V cache vs ``hoist_invariants`` on every sampler form (docs/benchmarks.md); its command line
  is :mod:`kvhoist.bench.command`, its ``--quick`` accelerator check :mod:`kvhoist.bench.quick`, the pass's
  own cost :mod:`kvhoist.bench.overhead`;
* :mod:`kvhoist.bench.decode`: encoder-decoder decoding (``python -m kvhoist.bench.decode``, docs/decode.md);
* :mod:`kvhoist.bench.dispatch`: per-call dispatch of the host-loop wrapper (``python -m kvhoist.bench.dispatch``);
* :mod:`kvhoist.bench.host`: a Python loop around a jitted step (``python -m kvhoist.bench.host``);
* :mod:`kvhoist.bench.trust`: what ``hoist_invariants`` costs where it cannot help (``python -m kvhoist.bench.trust``).
* :mod:`kvhoist.bench.probes`: issue 20's probes as small programs, jit vs hoisted, before and after
  (``python -m kvhoist.bench.probes``; docs/benchmarks.md);
* :mod:`kvhoist.bench.passtime`: the pass's time vs program size and the first call, jit vs hoisted
  (``python -m kvhoist.bench.passtime``; docs/benchmarks.md);
* :mod:`kvhoist.bench.hf_generate`: Hugging Face's Flax ``generate()`` (BART, T5, Marian), jit vs hoisted
  (``python -m kvhoist.bench.hf_generate``; needs transformers<=4.57.6; docs/benchmarks.md);
* :mod:`kvhoist.bench.sd_flax`: diffusers' Flax Stable Diffusion pipeline, jit vs hoisted
  (``python -m kvhoist.bench.sd_flax``; needs diffusers<=0.39, the ``hf-flax`` extra; docs/benchmarks.md).

Shared: :mod:`kvhoist.bench.forms` (configs, sampler forms, the random case), :mod:`kvhoist.bench.timing`
(interleaved runs, process CPU time), :mod:`kvhoist.bench.markdown` (the page); counting ops in compiled HLO is
the compiler's :mod:`kvhoist.hlo`. Importing this package imports nothing (no jax).
"""
