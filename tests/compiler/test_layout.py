"""The layout pass (kvhoist.repad_tokens): re-pad masked image tokens for a target, refuse the rest."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvhoist
from kvhoist import compat
from kvhoist.passes.layout import repad_tokens

nnx = pytest.importorskip("flax.nnx")


def run(closed, *args):
    return jax.jit(compat.jaxpr_as_fun(closed))(*jax.tree_util.tree_leaves(args))


def randn(seed, *shapes):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def shapes_in(closed) -> set:
    """Every dimension size of every value in the program, sub-jaxprs included."""
    out = set()

    def walk(j):
        _cv, _c, inv, outv, eqns = compat.split_closed(j)
        for v in list(inv) + list(_cv):
            out.update(v.aval.shape)
        for e in eqns:
            for v in e.outvars:
                out.update(getattr(v.aval, "shape", ()))
            for s in compat.subjaxprs_of(e):
                walk(s)

    walk(closed)
    return out


def pad_lengths(closed) -> set:
    """Lengths that `pad` equations (anywhere in the program) pad an axis to."""
    out = set()

    def walk(j):
        for e in compat.split_closed(j)[4]:
            if e.primitive.name == "pad":
                out.update(d for d, c in zip(e.outvars[0].aval.shape, e.params["padding_config"]) if tuple(c) != (0, 0, 0))
            for s in compat.subjaxprs_of(e):
                walk(s)

    walk(closed)
    return out


def repad_notes(report):
    return [n for n in report.notes if n.kind == "repad"]


def masked_attention(q, k, v, n):
    """Attention over keys padded to k.shape[0] with the padding masked as wan_ref does (iota < n)."""
    logits = q @ k.T
    logits = jnp.where(jnp.arange(k.shape[0]) < n, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1) @ v


def pad_tokens(x, to, axis=0):
    cfg = [(0, 0, 0)] * x.ndim
    cfg[axis] = (0, to - x.shape[axis], 0)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)


# --- hand-written programs -------------------------------------------------------------------------------

def test_masked_pad_is_repadded_and_exact():
    def f(q, img, wk, wv):
        p = pad_tokens(img, 384)
        return masked_attention(q, p @ wk, p @ wv, 257)

    args = randn(1, (8, 16), (257, 16), (16, 16), (16, 16))
    closed = jax.make_jaxpr(f)(*args)
    new, report = repad_tokens(closed, "v6e")
    assert 512 in shapes_in(new) and 384 not in shapes_in(new)
    (note,) = repad_notes(report)
    assert "257 tokens padded to 384" in note.message and "-> 512" in note.message
    assert note.bytes > 0 and not report.skipped
    assert rel_err(run(new, *args)[0], f(*args)) <= 1e-5
    # ... and back down: 512 (v6e) re-padded for v5e is 384 again.
    back, _ = repad_tokens(new, "v5e")
    assert 384 in shapes_in(back) and 512 not in shapes_in(back)
    assert rel_err(run(back, *args)[0], f(*args)) <= 1e-5


def test_unmasked_pad_is_left_unchanged_with_reason():
    def f(x, w):
        return jnp.sum(pad_tokens(x, 384) @ w, axis=0)  # sums over the padded positions

    args = (jnp.ones((257, 8)), jnp.ones((8, 4)))
    closed = jax.make_jaxpr(f)(*args)
    new, report = repad_tokens(closed, "v6e")
    assert new is closed
    (skip,) = report.skipped
    assert "without a mask" in skip.reason and "reduce_sum" in skip.reason
    assert any("left unchanged" in n.message for n in repad_notes(report))


def test_pad_reaching_output_is_left_unchanged():
    f = lambda x: pad_tokens(x, 384) * 2.0
    closed = jax.make_jaxpr(f)(jnp.ones((257, 8)))
    new, report = repad_tokens(closed, "v6e")
    assert new is closed and "output of the program" in report.skipped[0].reason


def test_text_padding_attended_unmasked_is_left_alone():
    # Text padded 300 -> 512 and attended without a mask (as Wan does); image padded (for v6e) and masked.
    def f(q, text, img, w):
        t = pad_tokens(text, 512) @ w
        i = pad_tokens(img, 512) @ w
        text_out = jax.nn.softmax(q @ t.T, axis=-1) @ t
        return text_out + masked_attention(q, i, i, 257)

    # (image tokens: 257 -> 512 becomes 257 -> 384)

    args = randn(2, (4, 8), (300, 8), (257, 8), (8, 8))
    closed = jax.make_jaxpr(f)(*args)
    new, report = repad_tokens(closed, "v5e")
    sizes = shapes_in(new)
    assert 384 in sizes and 512 in sizes  # image re-padded to 384 for v5e, text still padded to 512
    (skip,) = report.skipped
    assert "300 -> 512 left unchanged" in skip.reason and "without a mask" in skip.reason
    assert rel_err(run(new, *args)[0], f(*args)) <= 1e-5


def test_additive_bias_and_constant_keep_mask_maxdiffusion_style():
    keep = np.array([1.0] * 257 + [0.0] * 127, np.float32)  # a closed-over constant keep-mask

    def f(q, img, w):
        k = pad_tokens(img, 384) @ w
        logits = q @ k.T + (1.0 - keep) * -10000.0
        return jax.nn.softmax(logits, axis=-1) @ k

    args = randn(3, (4, 8), (257, 8), (8, 8))
    closed = jax.make_jaxpr(f)(*args)
    new, report = repad_tokens(closed, "v7x")
    assert 512 in shapes_in(new) and 384 not in shapes_in(new)
    (note,) = repad_notes(report)
    assert "assuming" in note.message  # exp(-1e4 + x) == 0 is an assumption on the logits' range
    assert rel_err(run(new, *args)[0], f(*args)) <= 1e-5


def test_concatenate_zeros_form_and_scan_cond_jit_bodies():
    # The padded keys enter a layer scan as a const, both branches of a cond, and a jit.
    def f(q, img, ws, flag):
        k = jnp.concatenate([img, jnp.zeros((127, img.shape[1]), img.dtype)], axis=0)
        mask = jnp.arange(384) < 257

        @jax.jit
        def attend(h, kk):
            return h + masked_attention(h, kk, kk, 257)

        def layer(h, w):
            kk = k @ w
            h = jax.lax.cond(flag, lambda: attend(h, kk), lambda: h - jnp.where(mask, kk.T, -jnp.inf).max(-1))
            return h, None

        return jax.lax.scan(layer, q, ws)[0]

    q, img, ws = randn(4, (4, 8), (257, 8), (3, 8, 8))
    args = (q, img, ws * 0.3)
    for flag in (True, False):
        closed = jax.make_jaxpr(f)(*args, flag)
        new, report = repad_tokens(closed, "v6e")
        assert 512 in shapes_in(new) and 384 not in shapes_in(new), report.table()
        assert rel_err(run(new, *args, flag)[0], f(*args, flag)) <= 1e-5


_COMPILES = [0]


def _count_compile(event: str, _duration: float, **_kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def _compiles(fn, *args):
    """``(fn(*args), XLA compiles it launched)``; caches cleared first (earlier eager ops would hide some)."""
    jax.clear_caches()
    _COMPILES[0] = 0
    out = jax.block_until_ready(fn(*args))
    return out, _COMPILES[0]


def test_layout_pass_launches_no_xla_compile():
    """The masking proof folds constants with numpy (a scalar `where` picking the fill here), never eager jax."""
    def f(q, img, wk, wv):
        p = pad_tokens(img, 384)
        k, v = p @ wk, p @ wv
        fill = jnp.where(q.shape[0] > 4, -jnp.inf, -1e30)   # a scalar select_n the analysis folds
        logits = jnp.where(jnp.arange(384) < 257, q @ k.T, fill)
        return jax.nn.softmax(logits, axis=-1) @ v

    args = randn(1, (8, 16), (257, 16), (16, 16), (16, 16))
    closed = jax.make_jaxpr(f)(*args)
    (new, report), n = _compiles(lambda c: kvhoist.optimize(c, target="v6e"), closed)
    assert n == 0, f"the layout pass launched {n} XLA compile(s)"
    assert 264 in shapes_in(new) and 384 not in shapes_in(new), report.table()  # the fill proven -inf
    want, n_jit = _compiles(jax.jit(f), *args)
    got, n_hoisted = _compiles(kvhoist.hoist_invariants(f, target="v6e"), *args)
    assert n_hoisted == n_jit == 1
    assert rel_err(got, want) <= 1e-5


def test_cpu_target_does_nothing_unless_asked():
    f = lambda q, img: masked_attention(q, pad_tokens(img, 384), pad_tokens(img, 384), 257)
    args = (jnp.ones((4, 8)), jnp.ones((257, 8)))
    closed = jax.make_jaxpr(f)(*args)
    same, report = repad_tokens(closed, "cpu")
    assert same is closed and "no MXU tile" in report.notes[0].message
    forced, _ = repad_tokens(closed, "gpu", alignment=256)
    assert 512 in shapes_in(forced)
    kept, report = repad_tokens(closed, "v5p")
    assert kept is closed and "already" in report.notes[0].message


def test_unknown_target_lists_known_names():
    with pytest.raises(kvhoist.KvhoistError, match="known: v4, v5e, v5p, v6e, v7x"):
        repad_tokens(jax.make_jaxpr(lambda x: x)(1.0), "v9000")


# --- wan_ref ------------------------------------------------------------------------------------------

IMAGE_TOKENS = {"tiny-i2v": (257, 384, 512), "tiny-flf2v": (514, 640, 768)}  # n, @128, @256
CHEAPEST = {"tiny-i2v": 264, "tiny-flf2v": 520}  # the least padding the masks allow (8-aligned)


@functools.lru_cache(maxsize=None)
def _wan(preset_name, dtype=jnp.float32):
    from wan_ref import WanModel, get_preset

    preset = get_preset(preset_name)
    cfg = dataclasses.replace(preset.config, image_token_alignment=128, dtype=dtype, param_dtype=dtype)
    # Shapes from WanModel(cfg, rngs=nnx.Rngs(0)), weights from numpy: eager init compiles every small
    # random op separately, which takes tens of seconds on a busy CPU.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(7)
    state = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.2, x.dtype), state)
    model = nnx.merge(graphdef, state)
    lat_shape = preset.latent_shape(1)
    n = IMAGE_TOKENS[preset_name][0]
    lat, pe, npe, image, condition = randn(
        0, lat_shape, (1, 512, cfg.text_dim), (1, 512, cfg.text_dim), (1, n, cfg.image_dim),
        (1, cfg.in_channels - lat_shape[1]) + tuple(lat_shape[2:]))
    return model, cfg, dict(latents=lat, pe=pe, npe=npe, image=image, condition=condition)


@pytest.mark.parametrize("preset_name", list(IMAGE_TOKENS))
def test_wan_forward_repadded_for_v6e(preset_name):
    n, old, new_len = IMAGE_TOKENS[preset_name]
    model, cfg, d = _wan(preset_name)
    x = jnp.concatenate([d["latents"], d["condition"]], axis=1)
    args = (model, x, jnp.array([500.0]), d["pe"], d["image"])
    closed = jax.make_jaxpr(lambda m, *a: m(*a))(*args)
    assert pad_lengths(closed) == {old}
    new, report = repad_tokens(closed, "v6e")
    assert pad_lengths(new) == {new_len} and old not in shapes_in(new)
    (note,) = repad_notes(report)
    assert f"{n} tokens padded to {old} (128-aligned) -> {new_len} (256-aligned for v6e)" in note.message
    assert rel_err(run(new, *args)[0], run(closed, *args)[0]) <= 1e-5


def test_wan_forward_repadded_in_bf16():
    """The real checkpoints run in bf16: its casts (probabilities to bf16 before P @ V) must not hide
    that padded positions are zero."""
    model, cfg, d = _wan("tiny-i2v", jnp.bfloat16)
    x = jnp.concatenate([d["latents"], d["condition"]], axis=1)
    args = (model, x, jnp.array([500.0]), d["pe"], d["image"])
    closed = jax.make_jaxpr(lambda m, *a: m(*a))(*args)
    new, report = repad_tokens(closed, "v6e")
    assert pad_lengths(closed) == {384} and pad_lengths(new) == {512}, report.table()
    assert rel_err(run(new, *args)[0], run(closed, *args)[0]) <= 1e-3   # measured: 0.0


@pytest.mark.parametrize("preset_name", list(IMAGE_TOKENS))
def test_wan_sampler_hoisted_for_v6e(preset_name):
    from wan_ref.sample import sample

    n, old, new_len = IMAGE_TOKENS[preset_name]
    model, cfg, d = _wan(preset_name)

    def sampler(m, latents, pe, npe, image, condition):
        return sample(m, latents, pe, npe, num_inference_steps=2, guidance_scale=5.0, image_embeds=image,
                      condition=condition, loop="scan")

    args = (model, d["latents"], d["pe"], d["npe"], d["image"], d["condition"])
    hoisted = kvhoist.hoist_invariants(sampler, target="v6e")
    report = hoisted.report(*args)
    # XLA's own attention: the TPU compiler pays per token, so the cheapest valid length is kept (not
    # the MXU tile, which the splash kernel needs: test_splash_keys_take_the_tile) and the note says why.
    image_kv = report.find("add_k_proj") + report.find("add_v_proj")
    assert len(image_kv) == 2 and all(h.shape[-3] == CHEAPEST[preset_name] for h in image_kv), report.table()
    (note,) = [x for x in report.notes if x.kind == "layout"]
    assert f"kept {CHEAPEST[preset_name]} tokens for v6e, the cheapest of" in note.message
    assert f"{new_len}: " in note.message and f"{old}: " in note.message   # the tile and the traced length, costed
    text_kv = [h for h in report.find("to_k") + report.find("to_v") if "add_" not in h.name]
    assert text_kv and all(h.shape[-3] == 512 for h in text_kv)  # text is not padded in-program
    before, _after = hoisted.jaxprs(*args)
    assert rel_err(hoisted(*args), run(before, *args)[0]) <= 1e-5


def test_wan_sampler_layout_and_licm_launch_no_xla_compile():
    from wan_ref.sample import sample

    model, cfg, d = _wan("tiny-i2v")
    args = (model, d["latents"], d["pe"], d["npe"], d["image"], d["condition"])
    closed = jax.make_jaxpr(lambda m, lat, pe, npe, img, c: sample(
        m, lat, pe, npe, num_inference_steps=2, image_embeds=img, condition=c, loop="scan"))(*args)
    (new, report), n = _compiles(lambda c: kvhoist.optimize(c, target="v6e"), closed)
    assert n == 0, f"the rewrite launched {n} XLA compile(s)"
    assert CHEAPEST["tiny-i2v"] in shapes_in(new) and report.hoisted, report.table()


def test_pipeline_order_layout_then_licm_equals_licm_then_layout():
    from wan_ref.sample import sample

    model, cfg, d = _wan("tiny-i2v")
    args = (model, d["latents"], d["pe"], d["npe"], d["image"], d["condition"])
    closed = jax.make_jaxpr(lambda m, lat, pe, npe, img, c: sample(
        m, lat, pe, npe, num_inference_steps=2, image_embeds=img, condition=c, loop="scan"))(*args)
    a, _ = kvhoist.optimize(closed, target="v6e")            # layout first (the pipeline's order)
    hoisted, _ = kvhoist.licm(closed)
    b, report_b = repad_tokens(hoisted, "v6e")               # LICM first
    assert repad_notes(report_b) and not report_b.skipped, report_b.table()
    assert 512 in shapes_in(b) and 384 not in shapes_in(b)
    # (a against the untouched program: test_wan_sampler_hoisted_for_v6e; one compile less here)
    assert rel_err(run(b, *args)[0], run(a, *args)[0]) <= 1e-5


@pytest.mark.parametrize("case", ["wrong_mask", "debug_print", "reshape_merge", "padding_removed"])
def test_refusals(case):
    q, img = randn(5, (4, 8), (257, 8))

    def f(q, img):
        k = pad_tokens(img, 384)
        if case == "wrong_mask":      # iota < 300 keeps 43 padded keys
            return jax.nn.softmax(jnp.where(jnp.arange(384) < 300, q @ k.T, -jnp.inf), axis=-1) @ k
        if case == "debug_print":
            jax.debug.print("{}", k)
        if case == "reshape_merge":
            return masked_attention(q, k, k, 257) + k.reshape(-1)[:8].sum()
        return masked_attention(q, k, k, 257)

    closed = jax.make_jaxpr(f)(q, img)
    if case == "padding_removed":    # 257 -> 257 at alignment 257: exp(-inf - m) in {0, nan} needs padding
        new, report = repad_tokens(closed, "gpu", alignment=257)
        reason = "removes it"
    else:
        new, report = repad_tokens(closed, "v6e")
        reason = {"wrong_mask": "without a mask", "debug_print": "cannot see through",
                  "reshape_merge": "merges the padded axis"}[case]
    assert new is closed, report.table()
    (skip,) = report.skipped
    assert reason in skip.reason, skip.reason
