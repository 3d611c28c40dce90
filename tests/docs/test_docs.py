"""Every ```python block in README.md and docs/*.md runs as written, without downloads.

A block that cannot run (an API listing, a file's contents that needs a package around it) is fenced as
```python-skip <reason>; anything else fenced as python is executed here, each block in a fresh namespace,
from an empty working directory. `tiny_inputs` (wan_ref.presets) is the documented way to get a model
and inputs, so it is tested here too."""

from __future__ import annotations

import functools
import pathlib
import re
import textwrap

import jax
import numpy as np
import pytest

from wan_ref.presets import PRESETS, SampleInputs, get_preset, tiny_inputs

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)


def blocks(info_prefix: str = "python") -> list[tuple[str, str, str]]:
    """(id "file:line", info string, dedented code) of every fenced block whose language is python*."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            info = m.group("info").strip()
            if info.split(" ")[0].startswith(info_prefix):
                line = text[:m.start()].count("\n") + 1
                out.append((f"{path.relative_to(ROOT)}:{line}", info, textwrap.dedent(m.group("body"))))
    return out


RUNNABLE = [(name, code) for name, info, code in blocks() if info == "python"]


def test_the_documentation_has_python_blocks_and_every_skip_says_why():
    assert len(RUNNABLE) >= 10, [n for n, _ in RUNNABLE]
    assert any(n.startswith("README.md") for n, _ in RUNNABLE)
    for name, info, _ in blocks():
        language = info.split(" ")[0]
        assert language in ("python", "python-skip"), f"{name}: unknown info string {info!r}"
        if language == "python-skip":
            assert len(info) > len("python-skip ") + 5, f"{name}: ```python-skip needs a reason after it"


@pytest.mark.parametrize("name, code", RUNNABLE, ids=[n for n, _ in RUNNABLE])
def test_doc_block_runs(name, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_block__", "__file__": str(tmp_path / "block.py")}
    exec(compile(code, name, "exec"), namespace)          # noqa: S102 - the documentation's own code


# -- tiny_inputs / Preset.inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-ti2v", "tiny-t2v-a14b", "tiny-vace",
                                  "tiny-animate"])
def test_tiny_inputs_trace_through_sample(name):
    from wan_ref import sample

    inputs = tiny_inputs(name)
    assert isinstance(inputs, SampleInputs) and inputs.preset.name == name and inputs.model is inputs.args[0]
    latents = inputs.args[1]
    assert isinstance(latents, jax.Array) and latents.shape == get_preset(name).latent_shape()
    out = jax.eval_shape(functools.partial(sample, **inputs.options), *inputs.args, **inputs.extra)
    assert out.shape == latents.shape
    assert ("model_2" in inputs.extra) == get_preset(name).two_experts
    assert inputs.kwargs == {**inputs.extra, **inputs.options}


def test_tiny_inputs_are_seeded():
    from flax import nnx

    a, b, c = tiny_inputs(seed=1), tiny_inputs(seed=1), tiny_inputs(seed=2)
    np.testing.assert_array_equal(a.args[1], b.args[1])
    assert not np.array_equal(a.args[1], c.args[1])
    wa, wb, wc = (jax.tree.leaves(nnx.state(x.model)) for x in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert not all(np.array_equal(x, y) for x, y in zip(wa, wc))
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in wa)
    # the weights are not degenerate: one forward step gives finite, non-constant velocities
    velocity = jax.jit(lambda m, x, pe: m(x, jax.numpy.array([999.0]), pe))(a.model, a.args[1], a.args[2])
    assert bool(np.isfinite(np.asarray(velocity)).all()) and float(np.std(np.asarray(velocity))) > 1e-3
    assert tiny_inputs(cfg=False).args[3] is None
    assert tiny_inputs(batch=2, text_len=16).args[2].shape == (2, 16, 32)


def test_full_size_inputs_are_abstract():
    inputs = tiny_inputs("wan2.1-t2v-1.3b")
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in inputs.args[1:])
    assert inputs.args[1].shape == (1, 16, 21, 60, 104) and inputs.options["num_inference_steps"] == 50
    leaves = jax.tree.leaves(inputs.model)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_tiny_inputs_bad_values():
    with pytest.raises(ValueError, match="did you mean"):
        tiny_inputs("tiny-t2x")
    with pytest.raises(ValueError, match="batch and text_len must be >= 1"):
        tiny_inputs(batch=0)
    assert set(n for n in PRESETS if n.startswith("tiny")) >= {"tiny-t2v", "tiny-i2v"}
