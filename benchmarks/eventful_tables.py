"""The markdown tables of docs/eventful.md from `eventful_real.py` results, so the docs quote the JSON exactly.

One table per clip and size (keyframe-and-hold K = 2..8, the previous dense
frame, the lower resolutions, every eventful setting) and the verdict
paragraph under it. `--update DOC --block NAME` rewrites, inside the block
`<!-- NAME: begin -->` ... `<!-- NAME: end -->` of DOC, each table whose
heading names a clip and size present in the JSON, and leaves the rest of
the block (other tables, held-out annotations) as it is.

Usage:
    python3 benchmarks/eventful_tables.py benchmarks/results/eventful_real_224.json     # print
    python3 benchmarks/eventful_tables.py benchmarks/results/eventful_real_224.json \\
        --update docs/eventful.md --block "eventful_real tables"
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from frugalvit.ioutil import atomic_file

VERDICT_KEYS = (("backbone_mac_ratio", "backbone MACs"), ("mac_ratio", "total MACs (decoder counted)"),
                ("mac_ratio, with eventful at lower resolution",
                 "total MACs, eventful at a lower resolution counted too"))


def method_name(row: dict[str, object]) -> str:
    """The table's name of a result row: the kind spelled out, non-default hold options appended."""
    kind, label = row["kind"], row["label"]
    if kind == "keyframe":
        return f"keyframe-and-hold {label.removeprefix('hold ')}"
    if kind in ("previous", "lowres"):
        return label
    options = row.get("options") or {}
    name = f"eventful {label}"
    if "hold_share" in options and options.get("max_held_frames", 3) != 3:
        name += f", max held {options['max_held_frames']}"
    if "hold_share" in options and options.get("cut_relative_error", 0.5) != 0.5:
        name += f", moved > {options['cut_relative_error']:g} of norm"
    return name + (" (map upsampled)" if kind == "eventful_lowres" else "")


def table(result: dict[str, object], heading: str | None = None) -> str:
    """One clip and size: heading, table, verdict paragraph."""
    lines = [heading or f"**{result['clip']}, {result['size']} px ({result['tokens']} tokens, "
                        f"{result['frames']} frames)**", "",
             "| method | backbone MAC ratio | total MAC ratio | map r mean / worst | top-10% IoU mean / worst "
             "| rel. L2 | held / full frames |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        if row["kind"] == "keyframe" and int(row["label"].split("=")[1]) > 8:
            continue
        frames = f"{row['held_frames']} / {row['full_frames']}" if "full_frames" in row else ""
        lines.append(f"| {method_name(row)} | {row['backbone_mac_ratio']:.2f}x | {row['mac_ratio']:.2f}x | "
                     f"{row['pearson_mean']:.4f} / {row['pearson_worst']:.3f} | {row['iou_top10_mean']:.3f} / "
                     f"{row['iou_top10_worst']:.3f} | {row['relative_l2_mean']:.3f} | {frames} |")
    parts = []
    for key, name in VERDICT_KEYS:
        verdicts = result["dominance"].get(key)
        if verdicts is None:
            continue
        beaten = [v for v in verdicts if v["beaten"]]
        text = f"{name}: {len(beaten)} of {len(verdicts)}"
        if beaten:
            text += " (" + "; ".join(f"{v['hold'].removeprefix('hold ')} by {v['by']} at {v['eventful_ratio']:.2f}x"
                                     for v in beaten) + ")"
        lost = [v["hold"].removeprefix("hold ") for v in verdicts if not v["beaten"]]
        if lost:
            text += f"; not beaten: {', '.join(lost)}"
        parts.append(text)
    lines += ["", "Keyframe-and-hold points in 2x-8x beaten on both mean r and mean IoU by an eventful setting "
                  "with at least the same MAC ratio: " + "; ".join(parts) + "."]
    return "\n".join(lines)


def split_block(doc: str, block: str, where: str = "the document") -> tuple[str, str, str]:
    """`doc` as (up to and including `<!-- block: begin -->`, the block's body, from `<!-- block: end -->` on);
    exits with one clear message (naming `where`) unless each marker occurs exactly once."""
    begin, end = f"<!-- {block}: begin -->", f"<!-- {block}: end -->"
    if doc.count(begin) != 1 or doc.count(end) != 1:
        raise SystemExit(f"{where} needs exactly one '{begin}' and one '{end}'")
    head, rest = doc.split(begin)
    body, tail = rest.split(end)
    return head + begin, body, end + tail


def update_block(doc: str, block: str, results: list[dict[str, object]]) -> str:
    """`doc` with each table of `results` rewritten inside `block` (its heading kept as written)."""
    head, body, tail = split_block(doc, block)
    for result in results:
        pattern = re.compile(rf"^\*\*{re.escape(result['clip'])}(?: \([^)\n]*\))?, {result['size']} px \([^\n]*\*\*$"
                             r"\n(?:.*\n)*?Keyframe-and-hold points in 2x-8x[^\n]*\n", re.MULTILINE)
        matches = list(pattern.finditer(body))
        if len(matches) != 1:
            raise SystemExit(f"block '{block}' has {len(matches)} tables for {result['clip']} at "
                             f"{result['size']} px; expected one")
        match = matches[0]
        heading = match.group(0).split("\n", 1)[0]
        body = body[:match.start()] + table(result, heading) + "\n" + body[match.end():]
    return head + body + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="eventful_real.py JSON files")
    parser.add_argument("--update", type=Path, help="a markdown file to rewrite in place")
    parser.add_argument("--block", help="the marked block of --update to rewrite")
    args = parser.parse_args(argv)
    if (args.update is None) != (args.block is None):
        parser.error("--update and --block go together")
    results = [result for path in args.results for result in json.loads(path.read_text())["results"]]
    if args.update is None:
        print("\n\n".join(table(result) for result in results))
        return 0
    text = update_block(args.update.read_text(), args.block, results)
    with atomic_file(args.update) as handle:
        handle.write(text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
