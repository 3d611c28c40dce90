"""Docs name only files that exist: every relative markdown link and every repository path or ``*.md`` a page cites.

A page citing a note that is not in the repository (comparison.md cited a FACTS.md) cannot be checked by a reader.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: File names a page may mention that are not files of this repository (a checkpoint's config.json).
NOT_REPOSITORY_FILES = {"config.json", "model_index.json", "scheduler_config.json"}  # a checkpoint's files
#: Pages another change is adding (the reference is checked again once the page exists).
PENDING: dict = {}

_PATH = re.compile(r"(?<![\w/.-])((?:kvhoist|wan_ref|tests|docs)/[\w./-]+\.(?:py|md|json)|[\w-]+\.(?:md|json))")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _exists(page: pathlib.Path, ref: str) -> bool:
    return any(p.exists() for p in (ROOT / ref, page.parent / ref, ROOT / "docs" / ref))


def test_docs_cite_only_existing_files():
    missing = []
    for page in PAGES:
        text = page.read_text()
        refs = {m.group(1) for m in _PATH.finditer(text)} | {m.group(1) for m in _LINK.finditer(text)
                                                            if not m.group(1).startswith(("http:", "https:"))}
        for ref in sorted(refs):
            name = pathlib.PurePosixPath(ref).name
            if name in NOT_REPOSITORY_FILES or name in PENDING:
                continue
            if not _exists(page, ref):
                missing.append(f"{page.relative_to(ROOT)}: {ref}")
    assert not missing, "docs cite files that do not exist:\n" + "\n".join(missing)


def _map_block() -> str:
    """The module map: the first fenced block of docs/design.md."""
    return (ROOT / "docs" / "design.md").read_text().split("```")[1]


def unmapped_modules(block: str) -> list[str]:
    """Modules of ``kvhoist/`` the map does not name (by path, or by name inside its package's entry)."""
    missing = []
    for path in sorted((ROOT / "kvhoist").rglob("*.py")):
        rel = path.relative_to(ROOT / "kvhoist")
        if path.stem in ("__init__", "__main__"):
            continue
        named = str(rel.as_posix()) in block or (len(rel.parts) > 1 and re.search(rf"\b{path.stem}\b", block))
        if not named:
            missing.append(str(rel.as_posix()))
    return missing


def test_the_design_map_names_every_module():
    """docs/design.md opens with the map (issue 19): a module added or moved without a line there fails."""
    block = _map_block()
    assert not unmapped_modules(block)
    assert unmapped_modules(block.replace("licm", "engine")) == ["passes/licm.py"]  # the check can fail
