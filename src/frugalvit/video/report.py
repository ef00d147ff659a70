"""The `frugalvit video` report: report.json and report.png."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from frugalvit.ioutil import json_bytes, write_files_atomically
from frugalvit.reporting import figure_png_bytes
from frugalvit.video.compare import ComparisonSummary, FrameRecord

REPORT_FILES = ("report.json", "report.png")


def plot_comparison(records: list[FrameRecord], title: str, measured: str = "backbone"):  # noqa: ANN201 - Figure
    """Per-frame GMACs, wall time and fidelity of dense vs eventful (`measured`: what the costs cover)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [r.index for r in records]
    figure, (macs_axis, time_axis, fidelity_axis) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    macs_axis.plot(frames, [r.dense_gmacs for r in records], label="dense (timm, fused SDPA)")
    macs_axis.plot(frames, [r.eventful_gmacs for r in records], label="eventful")
    macs_axis.set_ylabel(f"executed GMACs\n({measured})")
    macs_axis.legend(loc="upper right")
    time_axis.plot(frames, [r.dense_ms for r in records], label="dense")
    time_axis.plot(frames, [r.eventful_ms for r in records], label="eventful")
    time_axis.set_ylabel(f"wall time (ms)\n({measured})")
    time_axis.legend(loc="upper right")
    if records[0].task_pearson is not None:
        fidelity_axis.plot(frames, [r.task_pearson for r in records], label="map Pearson r")
        fidelity_axis.plot(frames, [r.task_iou_top10 for r in records], label="IoU of top-10% pixels")
    else:
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
                 summary: ComparisonSummary, extra_files: dict[str, bytes] | None = None) -> tuple[Path, Path]:
    """Write report.json, report.png and `extra_files` (name: bytes) into `out` (created if needed).

    Both files are rendered in memory first and then written together through
    temporary files and renames: on any error neither is replaced, no
    temporary file remains, and a directory created here is removed again.
    """
    import matplotlib.pyplot as plt

    weights = settings.get("weights", "")
    title = (f"{settings['model']} @ {settings['size']} px, {settings['policy']}, {weights}\n"
             f"speed-up {summary.speedup:.2f}x, MAC ratio {summary.mac_ratio:.2f}x, "
             + (f"map r {summary.task_pearson_mean:.4f}, top-10% IoU {summary.task_iou_top10_mean:.3f}"
                if summary.task_pearson_mean is not None else f"cosine {summary.cosine_mean:.4f}"))
    measured = settings.get("measured", "backbone")
    figure = plot_comparison(records, title, "backbone + decoder" if measured.startswith("whole") else "backbone")
    try:
        png = figure_png_bytes(figure)
    finally:
        plt.close(figure)
    report = json_bytes({"settings": settings, "summary": summary.as_dict(), "frames": [asdict(r) for r in records]})
    json_path, png_path = out / REPORT_FILES[0], out / REPORT_FILES[1]
    created = [parent for parent in (out, *out.parents) if not parent.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_files_atomically({json_path: report, png_path: png,
                                **{out / name: data for name, data in (extra_files or {}).items()}})
    except BaseException:
        for directory in created:  # innermost first; only those made here, and only while empty
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    return json_path, png_path
