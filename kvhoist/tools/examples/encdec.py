"""A small T5/Whisper-like encoder-decoder in plain JAX: greedy decoding and beam search in ``lax.while_loop``.

The decoding loops are written the way real decoders are (Flax's ``examples/wmt`` ``decode.py``, T5X,
Whisper): the encoder runs once; the decoder runs one token per sequence per iteration of a
``lax.while_loop``, with causal self-attention over a preallocated K/V cache that each step writes with
``lax.dynamic_update_slice``, and cross-attention to the encoder output. Beam search tiles the encoder
output across the beams *before* the loop and keeps beams flattened into the batch (``[batch * beams, ...]``).

Every iteration projects the same encoder output to the same cross-attention keys and values
(``cross_attn/k_proj``, ``cross_attn/v_proj``): loop-invariant work that ``kvhoist.hoist_invariants`` should
move out of the loop. ``hand_cache=True`` is the hand-written baseline: every layer's cross K/V computed once
before the loop from the *untiled* encoder output, and attended to by all beams of a sequence inside the loop
(a broadcast in the attention einsum, never a tiled copy).

Params are plain pytrees of arrays. The decoder's layer form is the params' layout:
``init_params(..., scan_layers=False)`` gives a list of per-layer dicts (a Python loop, unrolled in the
jaxpr); ``scan_layers=True`` stacks them along a leading axis and the decoder runs them in a ``lax.scan``
(its self-attention cache then has a leading layer axis too, carried through the scan as xs/ys).

Example:
    >>> cfg = EncDecConfig(vocab=32, d_model=32, heads=2, mlp=64, enc_layers=1, dec_layers=2, max_decode_len=8)
    >>> params = init_params(jax.random.key(0), cfg, scan_layers=True)
    >>> src = jax.random.randint(jax.random.key(1), (2, 12), 2, cfg.vocab)
    >>> seqs, scores = jax.jit(beam_search, static_argnames=("cfg", "beam_size"))(params, src, cfg=cfg, beam_size=4)
    >>> seqs.shape, scores.shape
    ((2, 4, 8), (2, 4))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["EncDecConfig", "init_params", "encode", "cross_kv", "decoder_step", "init_self_cache",
           "greedy_decode", "beam_search", "brevity_penalty", "NEG_INF"]

#: Large negative number standing for log(0) (Flax's beam search uses the same value).
NEG_INF = -1.0e7


@dataclasses.dataclass(frozen=True)
class EncDecConfig:
    """Model and decoding sizes. Frozen, so it can be a static argument of ``jax.jit``.

    ``pad_id`` doubles as the BOS token decoding starts from (T5's convention); ``eos_id`` ends a sequence.
    """

    vocab: int = 512
    d_model: int = 256
    heads: int = 4
    mlp: int = 1024
    enc_layers: int = 2
    dec_layers: int = 4
    max_decode_len: int = 32
    #: Biases on the attention projections (BART / Marian: ``x @ w + b``; T5 has none).
    proj_bias: bool = False
    pad_id: int = 0
    eos_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


# ------------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------------


def _dense(key, shape):
    return jax.random.normal(key, shape, jnp.float32) * shape[0] ** -0.5


def _attn_params(key, d: int, bias: bool = False) -> dict:
    kq, kk, kv, ko, kb = jax.random.split(key, 5)
    p = {"q": _dense(kq, (d, d)), "k": _dense(kk, (d, d)), "v": _dense(kv, (d, d)), "o": _dense(ko, (d, d))}
    if bias:
        p.update({f"b{n}": 0.1 * jax.random.normal(k, (d,), jnp.float32)
                  for n, k in zip("qkvo", jax.random.split(kb, 4))})
    return p


def _proj(a: dict, name: str, x):
    """``x @ a[name]`` plus its bias ``a['b' + name]`` when the model has projection biases."""
    y = x @ a[name]
    return y + a["b" + name] if "b" + name in a else y


def _mlp_params(key, d: int, hidden: int) -> dict:
    ki, ko = jax.random.split(key)
    return {"wi": _dense(ki, (d, hidden)), "wo": _dense(ko, (hidden, d))}


def init_params(key, cfg: EncDecConfig, *, scan_layers: bool = False) -> dict:
    """Random parameters. ``scan_layers`` stacks the decoder layers (leading axis ``dec_layers``).

    Norm scales are 1 + N(0, 0.1) so that nothing is trivially one. The output projection is separate from the
    token embedding (T5 v1.1): with random weights a tied one makes every row repeat its input token. It is drawn
    twice the fan-in scale so that random logits are peaked enough for decoding not to be a near-tie.
    """
    d = cfg.d_model
    k_embed, k_pos, k_enc, k_dec, k_norm, k_out = jax.random.split(key, 6)
    norm_keys = iter(jax.random.split(k_norm, 2 + 2 * cfg.enc_layers + 3 * cfg.dec_layers))

    def norm():
        return 1.0 + 0.1 * jax.random.normal(next(norm_keys), (d,), jnp.float32)

    encoder = []
    for k in jax.random.split(k_enc, cfg.enc_layers):
        ka, km = jax.random.split(k)
        encoder.append({"ln1": norm(), "attn": _attn_params(ka, d, cfg.proj_bias), "ln2": norm(), "mlp": _mlp_params(km, d, cfg.mlp)})
    decoder = []
    for k in jax.random.split(k_dec, cfg.dec_layers):
        ks, kc, km = jax.random.split(k, 3)
        decoder.append({"ln1": norm(), "self_attn": _attn_params(ks, d, cfg.proj_bias), "ln2": norm(),
                        "cross_attn": _attn_params(kc, d, cfg.proj_bias), "ln3": norm(), "mlp": _mlp_params(km, d, cfg.mlp)})
    if scan_layers:
        decoder = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *decoder)
    return {
        "embed": jax.random.normal(k_embed, (cfg.vocab, d), jnp.float32),
        "dec_pos": 0.5 * jax.random.normal(k_pos, (cfg.max_decode_len, d), jnp.float32),
        "encoder": encoder, "enc_norm": norm(),
        "decoder": decoder, "dec_norm": norm(),
        "unembed": 2.0 * _dense(k_out, (d, cfg.vocab)),
    }


def _scanned(params: dict) -> bool:
    """The decoder layer form: stacked layer params run in a ``lax.scan``; a list runs in a Python loop."""
    return not isinstance(params["decoder"], (list, tuple))


# ------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------


def rms_norm(x, scale, eps: float = 1e-6):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _heads(x, heads: int):
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def attention(q, k, v, bias=None):
    """Multi-head dot-product attention where one K/V row may serve several consecutive query rows.

    Args:
      q: ``[N, Tq, H, Dh]``.
      k, v: ``[M, Tk, H, Dh]`` with ``N = M * g``: query rows ``m*g .. m*g+g-1`` (the beams of sequence ``m``)
        all attend to K/V row ``m``. ``g = 1`` is ordinary attention; the hand-written cache uses ``g = beams``
        so that the untiled encoder K/V are never copied per beam.
      bias: additive logits bias broadcastable to ``[M, g, H, Tq, Tk]`` (a causal mask), or None.

    Returns:
      ``[N, Tq, H, Dh]``.
    """
    n, tq, h, dh = q.shape
    m = k.shape[0]
    qg = q.reshape(m, n // m, tq, h, dh)
    logits = jnp.einsum("mgqhd,mkhd->mghqk", qg, k) * dh ** -0.5
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("mghqk,mkhd->mgqhd", weights, v).reshape(n, tq, h, dh)


def _mlp(p, x):
    return jax.nn.gelu(x @ p["wi"]) @ p["wo"]


def sinusoid(length: int, d: int):
    """Whisper-style sinusoidal positions ``[length, d]`` ([sin, cos] halves), for any encoder length."""
    inv = jnp.exp(-math.log(10000.0) * jnp.arange(d // 2, dtype=jnp.float32) / (d // 2 - 1))
    t = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.concatenate([jnp.sin(t), jnp.cos(t)], axis=-1)


# ------------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------------


def encode(params: dict, src, cfg: EncDecConfig):
    """Bidirectional encoder: ``src [B, S]`` int tokens -> ``[B, S, D]``."""
    with jax.named_scope("encoder"):
        x = params["embed"][src] + sinusoid(src.shape[1], cfg.d_model)[None]
        for i, p in enumerate(params["encoder"]):
            with jax.named_scope(f"layer_{i}"):
                h = rms_norm(x, p["ln1"])
                a = p["attn"]
                q, k, v = (_heads(_proj(a, n, h), cfg.heads) for n in ("q", "k", "v"))
                x = x + _proj(a, "o", attention(q, k, v).reshape(x.shape))
                x = x + _mlp(p["mlp"], rms_norm(x, p["ln2"]))
        return rms_norm(x, params["enc_norm"])


# ------------------------------------------------------------------------------------------------------
# Decoder
# ------------------------------------------------------------------------------------------------------


def _project_kv(p: dict, enc, heads: int):
    """Cross-attention keys and values of the encoder output: ``[M, S, D] -> 2 x [M, S, H, Dh]``."""
    with jax.named_scope("k_proj"):
        k = _proj(p, "k", enc)
    with jax.named_scope("v_proj"):
        v = _proj(p, "v", enc)
    return _heads(k, heads), _heads(v, heads)


def cross_kv(params: dict, enc, cfg: EncDecConfig):
    """The hand-written cache: every decoder layer's cross-attention K/V of ``enc`` (computed once).

    Returns a list of ``(k, v)`` per layer for unrolled layers; for stacked layers one ``(k, v)`` pair with a
    leading layer axis, ``[L, M, S, H, Dh]``, computed as one batched matmul over the stacked weights.
    """
    with jax.named_scope("hand_cache"):
        if _scanned(params):
            w = params["decoder"]["cross_attn"]
            k = jnp.einsum("msd,lde->lmse", enc, w["k"])
            v = jnp.einsum("msd,lde->lmse", enc, w["v"])
            if "bk" in w:
                k, v = k + w["bk"][:, None, None], v + w["bv"][:, None, None]
            return _heads(k, cfg.heads), _heads(v, cfg.heads)
        return [_project_kv(p["cross_attn"], enc, cfg.heads) for p in params["decoder"]]


def init_self_cache(params: dict, cfg: EncDecConfig, n: int) -> Any:
    """A zeroed self-attention K/V cache for ``n`` rows: ``[n, T, H, Dh]`` per layer (leading ``L`` if stacked)."""
    shape = (n, cfg.max_decode_len, cfg.heads, cfg.head_dim)
    if _scanned(params):
        shape = (cfg.dec_layers, *shape)
        return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}
    return [{"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)} for _ in range(cfg.dec_layers)]


def _decoder_layer(p: dict, x, index, self_cache: dict, bias, enc, kv, cfg: EncDecConfig):
    """One decoder layer for one new token per row. Returns ``(x, updated self_cache)``.

    ``kv`` is this layer's precomputed cross K/V (hand cache) or None, in which case they are projected from
    ``enc`` here - once per decoding step, which is what kvhoist removes.
    """
    with jax.named_scope("self_attn"):
        a = p["self_attn"]
        h = rms_norm(x, p["ln1"])
        q, k, v = (_heads(_proj(a, n, h), cfg.heads) for n in ("q", "k", "v"))
        ck = lax.dynamic_update_slice(self_cache["k"], k, (0, index, 0, 0))
        cv = lax.dynamic_update_slice(self_cache["v"], v, (0, index, 0, 0))
        x = x + _proj(a, "o", attention(q, ck, cv, bias).reshape(x.shape))
    with jax.named_scope("cross_attn"):
        a = p["cross_attn"]
        q = _heads(_proj(a, "q", rms_norm(x, p["ln2"])), cfg.heads)
        k, v = _project_kv(a, enc, cfg.heads) if kv is None else kv
        x = x + _proj(a, "o", attention(q, k, v).reshape(x.shape))
    with jax.named_scope("mlp"):
        x = x + _mlp(p["mlp"], rms_norm(x, p["ln3"]))
    return x, {"k": ck, "v": cv}


def decoder_step(params: dict, cfg: EncDecConfig, tokens, index, self_cache, enc, kv=None):
    """Logits of the next token for each row, given the current token at position ``index``.

    Args:
      tokens: ``[N]`` int32, the token at ``index`` for each row.
      index: int32 scalar, the position being decoded.
      self_cache: the self-attention K/V cache (:func:`init_self_cache`); position ``index`` is written here.
      enc: encoder output, ``[N, S, D]`` (tiled across beams) - read when ``kv`` is None.
      kv: precomputed cross K/V (:func:`cross_kv`) of the untiled encoder output, ``[M, S, H, Dh]`` per layer with
        ``N = M * beams``, or None.

    Returns:
      ``(logits [N, vocab], updated self_cache)``.
    """
    with jax.named_scope("decoder"):
        x = params["embed"][tokens][:, None, :] + lax.dynamic_slice_in_dim(params["dec_pos"], index, 1)[None]
        bias = jnp.where(jnp.arange(cfg.max_decode_len) <= index, 0.0, NEG_INF)  # causal: positions <= index
        if _scanned(params):
            def layer(x, xs):
                p, c, layer_kv = xs
                return _decoder_layer(p, x, index, c, bias, enc, layer_kv, cfg)
            x, self_cache = lax.scan(layer, x, (params["decoder"], self_cache, kv))
        else:
            new_cache = []
            for i, p in enumerate(params["decoder"]):
                with jax.named_scope(f"layer_{i}"):
                    x, c = _decoder_layer(p, x, index, self_cache[i], bias, enc, None if kv is None else kv[i], cfg)
                new_cache.append(c)
            self_cache = new_cache
        x = rms_norm(x[:, 0], params["dec_norm"])
        return x @ params["unembed"], self_cache


# ------------------------------------------------------------------------------------------------------
# Greedy decoding
# ------------------------------------------------------------------------------------------------------


def greedy_decode(params: dict, src, *, cfg: EncDecConfig, hand_cache: bool = False):
    """Greedy decoding in a ``lax.while_loop`` that stops at ``max_decode_len`` or when every row has emitted EOS.

    Returns:
      ``(tokens [B, max_decode_len] int32, scores [B])``: tokens after BOS (``pad_id`` after EOS), and the sum of
      the chosen tokens' log-probabilities up to and including EOS.
    """
    b = src.shape[0]
    enc = encode(params, src, cfg)
    kv = cross_kv(params, enc, cfg) if hand_cache else None
    length = cfg.max_decode_len
    init = (jnp.int32(0), jnp.full((b, length + 1), cfg.pad_id, jnp.int32), init_self_cache(params, cfg, b),
            jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32))

    def cond(state):
        i, _, _, finished, _ = state
        return (i < length) & ~jnp.all(finished)

    def body(state):
        i, seqs, cache, finished, scores = state
        current = lax.dynamic_index_in_dim(seqs, i, axis=1, keepdims=False)
        logits, cache = decoder_step(params, cfg, current, i, cache, enc, kv)
        logp = jax.nn.log_softmax(logits)
        nxt = jnp.where(finished, cfg.pad_id, jnp.argmax(logp, axis=-1).astype(jnp.int32))
        gained = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
        scores = scores + jnp.where(finished, 0.0, gained)
        seqs = lax.dynamic_update_slice(seqs, nxt[:, None], (0, i + 1))
        return i + 1, seqs, cache, finished | (nxt == cfg.eos_id), scores

    _, seqs, _, _, scores = lax.while_loop(cond, body, init)
    return seqs[:, 1:], scores


# ------------------------------------------------------------------------------------------------------
# Beam search (after Flax examples/wmt decode.py)
# ------------------------------------------------------------------------------------------------------


def brevity_penalty(alpha: float, length):
    """GNMT length penalty ``((5 + length) / 6) ** alpha``; ``alpha = 0`` means none."""
    return jnp.power((5.0 + length) / 6.0, alpha)


def _gather_beams(x, beam_indices):
    """``x [B, beams, ...]`` -> ``x[b, beam_indices[b, j]]``: ``[B, new_beams, ...]``."""
    batch = jnp.arange(x.shape[0])[:, None]
    return x[batch, beam_indices]


def _gather_flat(tree, beam_indices, beams: int, axis: int):
    """Gather beams in flattened ``[B * beams]`` layout along ``axis`` (the self-attention cache)."""
    b, new = beam_indices.shape
    flat = (jnp.arange(b)[:, None] * beams + beam_indices).reshape(b * new)
    return jax.tree_util.tree_map(lambda x: jnp.take(x, flat, axis=axis, mode="clip"), tree)


def _top_k_beams(values, scores, k: int):
    """The ``k`` best of ``[B, 2k, ...]`` ``values`` (a tuple) by ``scores [B, 2k]``."""
    _, idx = lax.top_k(scores, k)
    return tuple(_gather_beams(v, idx) for v in values)


def beam_search(params: dict, src, *, cfg: EncDecConfig, beam_size: int = 4, alpha: float = 0.6,
                hand_cache: bool = False, tiling: str = "broadcast"):
    """Beam search in a ``lax.while_loop``, as Flax's WMT example: ``2k`` candidates per step, EOS candidates move
    to a finished set scored with the length penalty, the rest stay live; early stop when no live beam can beat
    the worst finished one.

    The encoder output is tiled across the beams before the loop (``[B * k, S, D]``), as ``tiling`` says:
    ``"broadcast"`` (``broadcast_to`` + ``reshape``: Hugging Face's ``_expand_to_num_beams``, Flax's
    ``flat_batch_beam_expand``) or ``"tile"`` (``expand_dims`` + ``jnp.tile`` + ``reshape``: Flax's examples/wmt
    ``beam_search``); the values are the same. With ``hand_cache`` the cross K/V are computed once from the
    untiled output instead and every beam reads its sequence's copy.

    Returns:
      ``(seqs [B, k, max_decode_len] int32, scores [B, k])``, best first. Scores are length-penalised
      log-probabilities of finished sequences, or raw log-probabilities of live ones for a row where no beam
      finished.
    """
    if tiling not in ("broadcast", "tile"):
        raise ValueError(f"tiling must be 'broadcast' or 'tile', got {tiling!r}")
    b, k, length = src.shape[0], beam_size, cfg.max_decode_len
    enc = encode(params, src, cfg)
    if hand_cache:
        kv, enc = cross_kv(params, enc, cfg), None
    else:
        kv = None
        wide = (jnp.broadcast_to(enc[:, None], (b, k, *enc.shape[1:])) if tiling == "broadcast"
                else jnp.tile(jnp.expand_dims(enc, 1), (1, k) + (1,) * (enc.ndim - 1)))
        enc = wide.reshape(b * k, *enc.shape[1:])
    cache_axis = 1 if _scanned(params) else 0
    live_logprobs = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
    init = dict(
        index=jnp.int32(0),
        live_logprobs=live_logprobs,
        finished_scores=jnp.full((b, k), NEG_INF, jnp.float32),
        live_seqs=jnp.full((b, k, length + 1), cfg.pad_id, jnp.int32),
        finished_seqs=jnp.full((b, k, length + 1), cfg.pad_id, jnp.int32),
        finished_flags=jnp.zeros((b, k), bool),
        cache=init_self_cache(params, cfg, b * k),
    )

    def cond(s):
        not_at_end = s["index"] < length
        # The best a live beam can still reach: its log-prob with the largest penalty divisor (log-probs < 0).
        # Flax divides the *worst* live beam (``live_logprobs[:, -1:]``), which can stop while the best live
        # beam could still win; the best one gives the exact stopping rule.
        best_live = s["live_logprobs"][:, :1] / brevity_penalty(alpha, length)
        worst_finished = jnp.where(s["finished_flags"], jnp.min(s["finished_scores"], axis=1, keepdims=True), NEG_INF)
        return not_at_end & ~jnp.all(worst_finished > best_live)

    def body(s):
        i = s["index"]
        current = lax.dynamic_index_in_dim(s["live_seqs"], i, axis=2, keepdims=False).reshape(b * k)
        logits, cache = decoder_step(params, cfg, current, i, s["cache"], enc, kv)
        logp = jax.nn.log_softmax(logits).reshape(b, k, cfg.vocab) + s["live_logprobs"][..., None]
        # 2k candidates: enough that k of them are not EOS.
        cand_logprobs, cand = lax.top_k(logp.reshape(b, k * cfg.vocab), 2 * k)
        cand_beams = cand // cfg.vocab
        cand_seqs = _gather_beams(s["live_seqs"], cand_beams)
        cand_seqs = lax.dynamic_update_slice(cand_seqs, (cand % cfg.vocab)[..., None].astype(jnp.int32), (0, 0, i + 1))
        ended = cand_seqs[:, :, i + 1] == cfg.eos_id
        # Live: the k best candidates that did not end.
        live_scores = cand_logprobs + ended * NEG_INF
        _, keep = lax.top_k(live_scores, k)
        live_seqs, live_logprobs, parents = (_gather_beams(v, keep) for v in (cand_seqs, live_scores, cand_beams))
        cache = _gather_flat(cache, parents, k, cache_axis)
        # Finished: merge the ended candidates (length-penalised) into the k best so far.
        new_scores = cand_logprobs / brevity_penalty(alpha, i + 1) + (~ended) * NEG_INF
        finished_seqs, finished_scores, finished_flags = _top_k_beams(
            (jnp.concatenate([s["finished_seqs"], cand_seqs], 1),
             jnp.concatenate([s["finished_scores"], new_scores], 1),
             jnp.concatenate([s["finished_flags"], ended], 1)),
            jnp.concatenate([s["finished_scores"], new_scores], 1), k)
        return dict(index=i + 1, live_logprobs=live_logprobs, finished_scores=finished_scores, live_seqs=live_seqs,
                    finished_seqs=finished_seqs, finished_flags=finished_flags, cache=cache)

    final = lax.while_loop(cond, body, init)
    # A row with no finished beam returns its live beams.
    any_finished = jnp.any(final["finished_flags"], axis=1)
    seqs = jnp.where(any_finished[:, None, None], final["finished_seqs"], final["live_seqs"])
    scores = jnp.where(any_finished[:, None], final["finished_scores"], final["live_logprobs"])
    return seqs[:, :, 1:], scores
