"""Import structure: the compiler core never imports the tooling, and never reaches up to the API layer.

The core is ``kvhoist.api``, ``ir``, ``compat``, ``errors``, ``report``, ``host``, ``targets`` and the
``analysis``, ``passes`` and ``rules`` packages. The tooling is the command line and what it shows or
measures (``cli``, ``diff``, ``graph``, ``specs``, ``progress``, ``bench*``, ``examples``) and ``wan_ref``.
A user who only calls ``hoist_invariants`` must not pay for (or break on) any of it.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "kvhoist"

CORE_MODULES = ("api", "ir", "compat", "errors", "report", "host", "targets")
CORE_PACKAGES = ("analysis", "passes", "rules")
TOOLING = ("kvhoist.tools", "kvhoist.bench", "wan_ref")


def _is_tooling(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") or module.startswith(t + "_") for t in TOOLING)


def _core_files() -> list[pathlib.Path]:
    files = [PKG / f"{m}.py" for m in CORE_MODULES]
    for p in CORE_PACKAGES:
        files += sorted((PKG / p).rglob("*.py"))
    return files


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every module an ``import`` statement of ``path`` names, at any depth (lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_core_sources_never_import_tooling():
    bad = [f"{p.relative_to(ROOT)}:{line}: imports {m}" for p in _core_files() for line, m in _imported(p)
           if _is_tooling(m)]
    assert not bad, "the compiler core imports tooling:\n" + "\n".join(bad)


def test_only_the_api_layer_imports_kvhoist_api():
    """``kvhoist.api`` (the decorator) sits on top of the passes: a pass or a target table that imports it
    pulls the whole API layer in (and closes an import circle through ``api -> targets -> api``)."""
    allowed = {"kvhoist/api.py", "kvhoist/host.py"}
    bad = [f"{p.relative_to(ROOT)}:{line}: imports {m}" for p in _core_files() for line, m in _imported(p)
           if str(p.relative_to(ROOT)) not in allowed and m in ("kvhoist.api", "kvhoist.host")]
    assert not bad, "upward imports of the API layer:\n" + "\n".join(bad)


_RUN_CORE = r"""
import sys
import jax, jax.numpy as jnp
{imports}

def sampler(w, c, x):
    def body(h, _):
        return h + jnp.tanh(c @ w).sum(), None
    return jax.lax.scan(body, x, None, length=3)[0]

w, c, x = jnp.ones((4, 4)), jnp.ones((4, 4)), jnp.ones((4,))
{work}
loaded = sorted(m for m in sys.modules if any(m == t or m.startswith(t + ".") or m.startswith(t + "_")
                                              for t in {tooling!r}))
print("LOADED=" + ",".join(loaded))
print("API=" + str("kvhoist.api" in sys.modules))
"""

_API_WORK = """
from kvhoist.api import hoist_invariants
f = hoist_invariants(sampler, target="v5e")
f(w, c, x); f.report(w, c, x).summary(); f.jaxprs(w, c, x)
step = hoist_invariants(lambda w, c, x, plan: sampler(w, c, x) * plan, invariant_argnums=(0, 1),
                        static_argnames=("plan",))
step(w, c, x, plan=2.0)
"""

_PIPELINE_WORK = """
from kvhoist.passes.pipeline import optimize
after, report = optimize(jax.make_jaxpr(sampler)(w, c, x), target="v5e")
report.summary()
"""


@pytest.mark.parametrize("imports, work, api_expected", [
    ("import kvhoist.api", _API_WORK, True),
    ("import kvhoist.passes.pipeline", _PIPELINE_WORK, False),
], ids=["api", "pipeline"])
def test_running_the_core_loads_no_tooling(imports, work, api_expected):
    code = _RUN_CORE.format(imports=imports, work=work, tooling=TOOLING)
    env = {k: v for k, v in os.environ.items() if k != "KVHOIST_DUMP_TO"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "LOADED=\n" in out, f"tooling loaded by the core: {out}"
    # the pipeline (and the target table it reads) must not pull the decorator layer in
    assert f"API={api_expected}" in out, out
