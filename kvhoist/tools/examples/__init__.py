"""Example programs written here to exercise kvhoist beyond Wan (not imported by ``import kvhoist``).

* :mod:`kvhoist.tools.examples.encdec` - a small T5/Whisper-like encoder-decoder with greedy decoding and beam
  search in ``lax.while_loop``; cross-attention K/V of the encoder output are the loop-invariant work.
"""
