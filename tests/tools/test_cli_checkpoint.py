"""A diffusers checkpoint folder as the SPEC of `kvhoist diff / report / graph / compile` (issue 21 item 1).

The folder is written by diffusers' own `save_pretrained` (a tiny two-expert `WanPipeline`: transformer,
transformer_2, a UniPC scheduler with flow_shift 7, a VAE; no text encoder) where torch + diffusers are
installed; the TPU venv has neither, so there the same files are written by `wan_ref.load.save_diffusers` and
JSON as diffusers writes it. The weight files are then overwritten with garbage: the CLI reads config.json only.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from kvhoist.tools import cli

HERE = pathlib.Path(__file__).resolve().parents[1]  # tests/: the shared helper modules
ROOT = HERE.parent
FLOW_SHIFT = 7.0        # not any default: seen in the output only if read from scheduler_config.json


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _write_with_diffusers(root: pathlib.Path) -> None:
    import diffusers

    sys.path.insert(0, str(HERE))
    from conftest import make_diffusers_wan
    from wan_ref.presets import get_preset

    p = get_preset("tiny-t2v-a14b")
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=FLOW_SHIFT)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=make_diffusers_wan(p.config),
                                 transformer_2=make_diffusers_wan(p.config_2, seed=1), scheduler=scheduler,
                                 boundary_ratio=0.875)
    pipe.save_pretrained(os.fspath(root))
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    euler.save_pretrained(os.fspath(root / "euler_scheduler"))


def _write_without_diffusers(root: pathlib.Path) -> None:
    """What `_write_with_diffusers` writes, for an environment without torch (the TPU venv)."""
    from wan_ref.load import save_diffusers
    from wan_ref.presets import tiny_inputs

    inputs = tiny_inputs("tiny-t2v-a14b")
    save_diffusers(inputs.model, root / "transformer")
    save_diffusers(inputs.extra["model_2"], root / "transformer_2")
    index = {"_class_name": "WanPipeline", "boundary_ratio": 0.875, "expand_timesteps": False,
             "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": [None, None],
             "tokenizer": [None, None], "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (root / "model_index.json").write_text(json.dumps(index))
    for folder, config in (("scheduler", {"_class_name": "UniPCMultistepScheduler", "flow_shift": FLOW_SHIFT,
                                          "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
                           ("euler_scheduler", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                "shift": FLOW_SHIFT}),
                           ("vae", {"_class_name": "AutoencoderKLWan", "z_dim": 4, "scale_factor_spatial": 8,
                                    "scale_factor_temporal": 4})):
        (root / folder).mkdir()
        name = "scheduler_config.json" if "scheduler" in folder else "config.json"
        (root / folder / name).write_text(json.dumps(config))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> pathlib.Path:
    """A tiny Wan 2.2 A14B-style pipeline folder whose weight files are garbage (nothing may load them)."""
    root = tmp_path_factory.mktemp("ckpt") / "Tiny-Wan2.2-T2V-A14B-Diffusers"
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        _write_without_diffusers(root)
    else:
        _write_with_diffusers(root)
    for weights in root.rglob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file: the CLI must not open weights")
    return root


def test_report_reads_a_pipeline_folder(capsys, pipeline):
    rc, out, err = run(capsys, "report", str(pipeline), "--json")
    assert rc == 0, err
    d = json.loads(out)
    first = d["program"]["description"]
    assert f"flow shift {FLOW_SHIFT:g}" in first and "boundary 0.875" in first and "two experts" in first
    assert "50 steps" in first and "81x480x832 px" in first   # WanPipeline.__call__'s defaults
    branches = {h["branch"] for h in d["hoisted"] if "to_k" in h["name"]}
    assert len(branches) == 2                                  # each expert's K/V: both transformers read


def test_diff_and_graph_read_a_pipeline_folder(capsys, pipeline, tmp_path):
    rc, out, err = run(capsys, "diff", str(pipeline), "--no-color", "--steps", "4", "--no-summary")
    assert rc == 0, err
    assert any(l.startswith("+") and "attn2/to_k" in l and ">> hoisted" in l for l in out.splitlines())
    rc, out, err = run(capsys, "graph", str(pipeline), "--out", str(tmp_path / "g.dot"))
    assert rc == 0, err
    dot = (tmp_path / "g.dot").read_text()
    assert "model.blocks.attn2.to_k.kernel" in dot and "model_2.blocks.attn2.to_k.kernel" in dot


def test_transformer_folder_and_its_pipelines_scheduler(capsys, pipeline):
    rc, out, err = run(capsys, "report", str(pipeline / "transformer_2"), "--steps", "6")
    assert rc == 0, err
    first = out.splitlines()[0]
    assert f"flow shift {FLOW_SHIFT:g}, unipc)" in first and "two experts" not in first and "6 steps" in first


def test_euler_scheduler_and_explicit_scheduler_option(capsys, pipeline, tmp_path):
    from kvhoist.tools.checkpoint import checkpoint_preset

    # a pipeline whose scheduler is FlowMatchEulerDiscreteScheduler: `shift` is its flow shift
    import shutil

    other = tmp_path / "pipe"
    shutil.copytree(pipeline, other)
    shutil.rmtree(other / "scheduler")
    (other / "euler_scheduler").rename(other / "scheduler")
    preset, scheduler = checkpoint_preset(str(other))
    assert scheduler == "euler" and preset.flow_shift == FLOW_SHIFT and preset.boundary_ratio == 0.875
    rc, out, err = run(capsys, "report", str(other), "--scheduler", "unipc", "--steps", "4")
    assert rc == 0 and "unipc, boundary 0.875)" in out.splitlines()[0], err


@pytest.mark.parametrize("folder, needle", [
    ("vae", "holds a AutoencoderKLWan, not a Wan transformer: pass the pipeline folder"),
    ("scheduler", "a scheduler folder (scheduler_config.json), not a Wan transformer"),
])
def test_other_components_are_refused_in_one_line(capsys, pipeline, folder, needle):
    rc, out, err = run(capsys, "report", str(pipeline / folder))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


def test_text_encoder_folder_is_refused(capsys, tmp_path):
    folder = tmp_path / "text_encoder"
    transformers = pytest.importorskip("transformers")
    config = transformers.UMT5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    transformers.UMT5EncoderModel(config).save_pretrained(os.fspath(folder))
    capsys.readouterr()                                        # transformers' own progress lines
    rc, _, err = run(capsys, "diff", str(folder))
    assert rc == 2 and "holds a UMT5EncoderModel, not a Wan transformer" in err and len(err.splitlines()) == 1


def test_not_a_checkpoint(capsys, tmp_path):
    rc, _, err = run(capsys, "report", str(tmp_path))
    assert rc == 2 and "no model_index.json or config.json: not a diffusers checkpoint" in err
    rc, _, err = run(capsys, "report", str(tmp_path / "missing"))
    assert rc == 2 and "no such folder" in err


def test_spec_written_as_a_path(capsys, monkeypatch, tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "samplers.py").write_text((HERE / "cli_user_module.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, out, err = run(capsys, "report", "mypkg/samplers.py:make_sampler")
    assert rc == 0 and "to_k" in out, err
    rc, _, err = run(capsys, "report", "mypkg/nothere.py:make_sampler")
    assert rc == 2 and "no file mypkg/nothere.py" in err and len(err.splitlines()) == 1
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rc, _, err = run(capsys, "report", "../mypkg/samplers.py:make_sampler")
    assert rc == 2 and f"cd {pkg} && kvhoist ... samplers:make_sampler" in err, err


def _tpu_python() -> str | None:
    venv = os.environ.get("KVHOIST_TPU_VENV", str(ROOT / ".venvtpu"))
    python = os.path.join(venv, "bin", "python")
    return python if os.path.isfile(python) else None


COMPILE = ["compile", "--target", "v6e", "--steps", "4", "--height", "32", "--width", "32", "--frames", "5",
           "--json"]


def _check_compile_json(out: str) -> None:
    d = json.loads(out)
    assert set(d["variants"]) == {"plain", "hand", "hoisted"}
    assert d["variants"]["hoisted"]["matmuls_inside"] < d["variants"]["plain"]["matmuls_inside"]
    assert f"flow shift {FLOW_SHIFT:g}" in d["description"]


@pytest.mark.tpu
def test_compile_reads_a_checkpoint_folder(capsys, pipeline):
    pytest.importorskip("libtpu", reason="libtpu is not installed: pip install -e '.[tpu]'")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rc, out, err = run(capsys, COMPILE[0], str(pipeline), *COMPILE[1:])
    assert rc == 0, err
    _check_compile_json(out)


def test_compile_in_the_tpu_venv_reads_a_save_pretrained_folder(pipeline):
    """The folder diffusers wrote (this environment) compiled by the TPU venv's kvhoist (which has no torch)."""
    python = _tpu_python()
    if python is None:
        pytest.skip("no TPU venv (.venvtpu or KVHOIST_TPU_VENV): .ci/run creates it")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
    proc = subprocess.run([python, "-m", "kvhoist", COMPILE[0], str(pipeline), *COMPILE[1:]], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_compile_json(proc.stdout)
