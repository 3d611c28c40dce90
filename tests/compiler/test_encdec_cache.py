"""Issue 12, "the cache equals one untiled copy": what hoist_invariants caches for encoder-decoder decoding.

Beam search tiles the encoder output across the beams before the while loop, so the cross K/V projections in the
loop read ``k`` identical copies of each sequence's encoder output. A hand-written cache projects the untiled
output once (``[B, S, H, Dh]`` per layer) and lets every beam read its sequence's row. The pass must cache no more:
the hoisted cross K/V of every case are exactly one untiled copy, and everything the pass caches is at most what
the hand-written program holds (its cross K/V plus whatever the pass itself hoists from it - a few scalars).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

import kvhoist
from kvhoist import contract
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


def _loop_values(closed) -> list:
    """Shapes of every value the decoding loop computes (recursively: the layer scan's body too)."""
    from kvhoist.ir import all_eqns

    loop = next(e for e in closed.jaxpr.eqns if e.primitive.name == "while")
    return [tuple(v.aval.shape) for e in all_eqns(loop.params["body_jaxpr"]) for v in e.outvars]


def _tiled_cross_kv_shapes(beams: int) -> set:
    rows, per_head = BATCH * beams, (SRC_LEN, CFG.heads, CFG.head_dim)
    shapes = {(rows, *per_head), (BATCH, beams, *per_head), (rows, SRC_LEN, CFG.d_model)}
    return shapes | {(CFG.dec_layers, *s) for s in shapes}   # stacked for the layer scan


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_beam_loop_reads_the_untiled_cache(scan):
    """Issue 20 item 2: one copy cached, and the loop never rebuilds the tiled K/V (no per-step re-tiling)."""
    after = run_case("beam", 4, scan)["after"]
    assert not _tiled_cross_kv_shapes(4) & set(_loop_values(after))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_tile_and_biased_projections_cache_one_copy(scan):
    """Issue 20 items 10 and 11: Flax's ``jnp.tile`` beam expansion and BART-style ``k_proj``/``v_proj`` biases;
    the cross K/V are one untiled copy, the loop reads it without re-tiling, tokens are jit's."""
    cfg = dataclasses.replace(CFG, proj_bias=True)
    params = E.init_params(jax.random.key(1), cfg, scan_layers=scan)
    src = make_inputs(scan)[1]

    def decode(params, src):
        return E.beam_search(params, src, cfg=cfg, beam_size=4, tiling="tile")

    hf = kvhoist.hoist_invariants(decode)
    report = hf.report(params, src)
    one_copy = 2 * cfg.dec_layers * BATCH * SRC_LEN * cfg.d_model * 4
    cross = [h for h in report.hoisted if "cross_attn/" in h.name]
    assert sum(h.bytes for h in cross) == one_copy, [(h.name, h.shape, h.bytes) for h in cross]
    assert not _tiled_cross_kv_shapes(4) & set(_loop_values(hf.jaxprs(params, src)[1]))
    (seqs, scores), (seqs_jit, scores_jit) = hf(params, src), jax.jit(decode)(params, src)
    np.testing.assert_array_equal(seqs, seqs_jit)
    contract.assert_close(scores, scores_jit)
