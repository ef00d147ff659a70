"""Every python code block of README.md and docs/*.md runs as written (random weights, small inputs, no download).

The blocks of one file run in order in one namespace, as a reader would type
them, in a temporary working directory. A block that truly cannot run here is
skipped only when the line just before its fence says why:
`<!-- docs-test: skip REASON -->`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
DOWNLOAD = re.compile(r"pretrained\s*=\s*True")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of every ```python block in `path`."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        previous = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(previous)
        blocks.append((line, match.group(1), skip.group(1).strip() if skip else None))
    return blocks


def test_documents_have_python_blocks() -> None:
    counted = {path.name: len(python_blocks(path)) for path in DOCUMENTS}
    assert counted["README.md"] >= 2 and sum(counted.values()) >= 5, counted


@pytest.mark.parametrize("path", DOCUMENTS, ids=[path.name for path in DOCUMENTS])
def test_python_blocks_run_as_written(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)  # blocks may save files (e.g. torch.save(..., "eco.pt"))
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    threads = torch.get_num_threads()
    try:
        for line, code, skip in blocks:
            if skip is not None:
                assert skip, f"{path.name}:{line}: a skipped block must say why: <!-- docs-test: skip REASON -->"
                continue
            downloads = [row for row in code.splitlines() if DOWNLOAD.search(row.split("#")[0])]
            assert not downloads, (f"{path.name}:{line}: examples must run offline; use pretrained=False "
                                   f"(and say in a comment where pretrained weights apply): {downloads}")
            try:
                exec(compile(code, f"{path.name}:{line}", "exec"), namespace)  # noqa: S102 - the docs are ours
            except Exception as error:
                pytest.fail(f"{path.relative_to(ROOT)} block at line {line} fails: {type(error).__name__}: {error}")
    finally:
        torch.set_num_threads(threads)
