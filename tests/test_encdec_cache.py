"""Issue 12, "the cache equals one untiled copy": what hoist_invariants caches for encoder-decoder decoding.

Beam search tiles the encoder output across the beams before the while loop, so the cross K/V projections in the
loop read ``k`` identical copies of each sequence's encoder output. A hand-written cache projects the untiled
output once (``[B, S, H, Dh]`` per layer) and lets every beam read its sequence's row. The pass must cache no more:
the hoisted cross K/V of every case are exactly one untiled copy, and everything the pass caches is at most what
the hand-written program holds (its cross K/V plus whatever the pass itself hoists from it - a few scalars).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import kvhoist
from kvhoist.tools.examples import encdec as E
from test_encdec import BATCH, CASES, CFG, IDS, SRC_LEN, decode_fn, make_inputs, run_case


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def hand_cache_bytes(scan: bool) -> int:
    """Bytes of the hand-written cache: every layer's cross K/V of the untiled encoder output."""
    params, src = make_inputs(scan)
    return tree_bytes(jax.eval_shape(lambda p, s: E.cross_kv(p, E.encode(p, s, CFG), CFG), params, src))


@pytest.mark.parametrize("decoder,beams,scan", CASES, ids=IDS)
def test_cross_kv_cache_is_one_untiled_copy(decoder, beams, scan):
    one_copy = 2 * CFG.dec_layers * BATCH * SRC_LEN * CFG.d_model * 4  # K and V, every layer, f32
    assert hand_cache_bytes(scan) == one_copy
    report = run_case(decoder, beams, scan)["report"]
    cross = [h for h in report.hoisted if "cross_attn/" in h.name]
    assert sum(h.bytes for h in cross) == one_copy, [(h.name, h.shape, h.bytes) for h in cross]


@pytest.mark.parametrize("decoder,beams,scan", CASES, ids=IDS)
def test_cache_no_bigger_than_hand_written(decoder, beams, scan):
    params, src = make_inputs(scan)
    # The hand-written program run through the pass too: what it caches on top of its own K/V (tiny hoisted
    # scalars such as the beam offsets) is allowed on both sides.
    hand_extra = kvhoist.hoist_invariants(decode_fn(decoder, beams, hand_cache=True)).report(params, src).cache_bytes
    report = run_case(decoder, beams, scan)["report"]
    assert report.cache_bytes <= hand_cache_bytes(scan) + hand_extra, report.table()
