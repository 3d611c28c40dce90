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
