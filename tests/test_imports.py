"""Import structure: the compiler never imports its tools, and no two kvhoist modules import each other.

The compiler is everything under ``kvhoist/`` except the tool packages: the jit and host-loop wrappers,
``ir``, ``compat``, ``errors``, ``report``, ``kernels``, ``targets``, ``hlo``, ``tpu_compile`` and the
``analysis``, ``passes`` and ``rules`` packages. The tools are ``kvhoist.tools`` (the command line and what it
shows or runs) and ``kvhoist.bench`` (the benchmarks); ``wan_ref`` is a model the tools and tests use. A user
who only calls ``hoist_invariants`` must not pay for (or break on) any of them.

Every ``import`` statement counts, lazy ones inside functions included; only ``if TYPE_CHECKING:`` blocks
(never executed) are skipped.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "kvhoist"

#: ``kvhoist.__main__`` is ``python -m kvhoist``: the command line's entry, never run by ``import kvhoist``.
TOOL_PACKAGES = ("kvhoist.tools", "kvhoist.bench", "kvhoist.__main__")
TOOLING = TOOL_PACKAGES + ("wan_ref",)

#: Import circles that exist today and are being removed (issue 19, the core half): each is the set of
#: modules of one strongly connected component of the import graph. This list must shrink to empty: the
#: test fails on any circle not listed here, and on a listed circle that no longer exists (delete its
#: line when you break it).
KNOWN_CIRCLES: tuple[frozenset[str], ...] = (
)


def _is_tooling(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOLING)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _all_files() -> list[pathlib.Path]:
    return sorted(PKG.rglob("*.py"))


def _compiler_files() -> list[pathlib.Path]:
    return [p for p in _all_files() if not _is_tooling(_module_name(p))]


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imported(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every module an ``import`` statement of ``path`` names, at any depth (lazy imports included):
    ``from a import b`` names ``a`` and ``a.b`` (``b`` may be a submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def import_graph() -> nx.DiGraph:
    """Modules of ``kvhoist`` and the ``kvhoist`` modules each imports (a name that is not a module, e.g.
    ``from kvhoist.report import Note``, resolves to the module that defines it)."""
    files = {_module_name(p): p for p in _all_files()}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for module, path in files.items():
        for _line, name in _imported(path):
            target = name
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != module and name.startswith("kvhoist"):
                g.add_edge(module, target)
    return g


def import_circles() -> set[frozenset[str]]:
    """The import circles: strongly connected components of more than one module."""
    return {frozenset(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1}


def test_compiler_never_imports_tools_or_wan_ref():
    bad = [f"{p.relative_to(ROOT)}:{line}: imports {m}" for p in _compiler_files() for line, m in _imported(p)
           if _is_tooling(m)]
    assert not bad, "the compiler imports a tool (or wan_ref):\n" + "\n".join(bad)


def test_the_compiler_files_are_what_the_map_says():
    """The walk above sees the compiler: the wrappers, the passes and the HLO reader are in it, no tool is."""
    names = {_module_name(p) for p in _compiler_files()}
    assert {"kvhoist.api", "kvhoist.host", "kvhoist.hlo", "kvhoist.tpu_compile", "kvhoist.passes.layout.plan",
            "kvhoist.passes.licm", "kvhoist.analysis.motion"} <= names
    assert not {n for n in names if _is_tooling(n)}
    tools = {_module_name(p) for p in _all_files()} - names
    assert {"kvhoist.tools.cli", "kvhoist.tools.specs", "kvhoist.bench.samplers"} <= tools


#: Issue 19: a module owns one concern; past this many lines it is split by concern.
MAX_MODULE_LINES = 700


def test_no_module_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in sorted(PKG.rglob("*.py")) + sorted((ROOT / "wan_ref").rglob("*.py"))}
    big = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {big}"


def _private_imports(path: pathlib.Path) -> list[str]:
    """``from kvhoist.x import _name`` statements of ``path``: a private name crossing modules."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("kvhoist"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {base}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_crosses_kvhoist_modules():
    """What one module uses of another is that module's public (documented) interface."""
    bad = [line for p in _all_files() for line in _private_imports(p)]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_private_import_check_sees_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "kvhoist" / "passes"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    from .b import _hidden, shown\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _private_imports(pkg / "a.py") == ["kvhoist/passes/a.py:2: kvhoist.passes.b._hidden"]


def test_tests_mirror_the_package():
    """tests/ holds the shared helpers and this file; every test module sits in the folder of what it tests."""
    here = ROOT / "tests"
    assert sorted(p.name for p in here.glob("test_*.py")) == ["test_imports.py"]
    assert {p.parent.name for p in here.glob("*/test_*.py")} == {"compiler", "tools", "wan_ref", "docs"}


def test_no_new_import_circles():
    found = import_circles()
    g = import_graph()
    new = [c for c in found if c not in KNOWN_CIRCLES]

    def describe(c):
        cycle = nx.find_cycle(g.subgraph(c))
        return " -> ".join([a for a, _b in cycle] + [cycle[0][0]])

    assert not new, "new import circle(s):\n" + "\n".join(describe(c) for c in new)
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert not gone, f"listed in KNOWN_CIRCLES but no longer a circle (remove them from the list): {gone}"


def test_the_circle_check_sees_lazy_imports(tmp_path, monkeypatch):
    """The walk counts an import inside a function and ignores one under ``if TYPE_CHECKING:``."""
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kvhoist.api\n"
                 "def g():\n    from kvhoist.passes import pipeline\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [m for _l, m in _imported(f)] == ["typing", "typing.TYPE_CHECKING", "kvhoist.passes",
                                             "kvhoist.passes.pipeline"]


def test_only_the_api_layer_imports_kvhoist_api():
    """``kvhoist.api`` (the decorator) sits on top of the passes: a pass or a target table that imports it
    pulls the whole API layer in (and closes an import circle through ``api -> targets -> api``)."""
    allowed = {"kvhoist/api.py", "kvhoist/host.py"}
    bad = [f"{p.relative_to(ROOT)}:{line}: imports {m}" for p in _compiler_files() for line, m in _imported(p)
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
