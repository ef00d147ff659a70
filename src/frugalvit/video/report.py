"""The `frugalvit video` report: report.json and report.png."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from frugalvit.reporting import save_figure_atomically, write_json_atomically
from frugalvit.video.compare import ComparisonSummary, FrameRecord


def plot_comparison(records: list[FrameRecord], title: str):  # noqa: ANN201 - matplotlib Figure
    """Per-frame GMACs, wall time and fidelity of dense vs eventful."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [r.index for r in records]
    figure, (macs_axis, time_axis, fidelity_axis) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    macs_axis.plot(frames, [r.dense_gmacs for r in records], label="dense (timm, fused SDPA)")
    macs_axis.plot(frames, [r.eventful_gmacs for r in records], label="eventful")
    macs_axis.set_ylabel("executed GMACs")
    macs_axis.legend(loc="upper right")
    time_axis.plot(frames, [r.dense_ms for r in records], label="dense")
    time_axis.plot(frames, [r.eventful_ms for r in records], label="eventful")
    time_axis.set_ylabel("wall time (ms)")
    time_axis.legend(loc="upper right")
    fidelity_axis.plot(frames, [r.cosine for r in records], label="cosine similarity of features")
    fidelity_axis.plot(frames, [1.0 - r.relative_l2 for r in records], label="1 - relative L2 error")
    fidelity_axis.set_ylabel("fidelity vs dense")
    fidelity_axis.set_xlabel("frame")
    fidelity_axis.legend(loc="lower right")
    for axis in (macs_axis, time_axis, fidelity_axis):
        for record in records:
            if record.full_update and record.index > 0:
                axis.axvline(record.index, color="grey", alpha=0.3, linewidth=1)
    figure.suptitle(title)
    return figure


def write_report(out: Path, settings: dict[str, Any], records: list[FrameRecord],
                 summary: ComparisonSummary) -> tuple[Path, Path]:
    """Write report.json and report.png into `out` (created if needed); each file appears whole."""
    import matplotlib.pyplot as plt

    weights = settings.get("weights", "")
    title = (f"{settings['model']} @ {settings['size']} px, {settings['policy']}, {weights}\n"
             f"speed-up {summary.speedup:.2f}x, MAC ratio {summary.mac_ratio:.2f}x, "
             f"cosine {summary.cosine_mean:.4f}")
    figure = plot_comparison(records, title)
    json_path, png_path = out / "report.json", out / "report.png"
    try:
        save_figure_atomically(figure, png_path)
    finally:
        plt.close(figure)
    write_json_atomically({"settings": settings, "summary": summary.as_dict(),
                           "frames": [asdict(r) for r in records]}, json_path)
    return json_path, png_path
