"""Writing results: JSON and PNG files appear whole or not at all (through `frugalvit.ioutil`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from frugalvit.ioutil import atomic_file, write_json_atomically

__all__ = ["figure_png_bytes", "save_figure_atomically", "write_json_atomically"]


def figure_png_bytes(figure: Any, dpi: int = 120) -> bytes:
    """Render a matplotlib figure to PNG bytes in memory (so that rendering errors happen before any write)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_figure_atomically(figure: Any, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG to `path` whole or not at all; the parent directory is created if needed."""
    path = Path(path)
    payload = figure_png_bytes(figure, dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        handle.write(payload)
