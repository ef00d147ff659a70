"""Issue #9's scoreboard: does Eventful's best setting beat keyframe-and-hold at every 2x-8x point?

Reads the committed real-weights results (`eventful_real_*.json`,
`eventful_motion_*.json`: each one clip and size with one choice of
`attention_rows` / `token_selection`, with or without motion-compensated held
maps) and, for every keyframe-and-hold point K = 2..8 (the dense model every
K-th frame, its map held; whole-model MAC ratio 2-7.5x) of each clip and size,
asks whether any eventful row with at least that whole-model MAC ratio has a
higher mean saliency Pearson r *and* a higher mean top-10% IoU. "Best setting"
is the issue's wording: the winner may come from any file, so this is an
in-sample choice over settings picked on these clips (docs/eventful.md says
which). Nothing is run; it only reads JSON.

Usage:
    python3 benchmarks/eventful_verdicts.py [--results benchmarks/results] [--clips bigbuckbunny bikes]
        [--sizes 224 448 896] [--out FILE.json] [--update docs/eventful.md] [--held-out DIR]

`--update DOC` also writes the table into DOC's block `<!-- eventful_verdicts: begin -->` ... `end`.

`--held-out DIR`: the out-of-sample check. DIR holds result files of the same
names (and configurations) run on other frames of the same clips
(`--start-frame`); each point's setting is the one chosen above, on the
in-sample frames, and it counts as beating keyframe-and-hold on the held-out
frames only if there too it saves at least the hold point's MACs and is
better on both mean r and mean IoU. The best held-out setting per point (a
choice made on the held-out frames themselves) is printed as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from frugalvit.ioutil import atomic_file, write_json_atomically

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eventful_real import beats, budget_target, dominance  # noqa: E402 - the benchmark beside: its verdict rule
from eventful_tables import split_block  # noqa: E402 - the docs' marked blocks

EVENTFUL_KINDS = ("eventful", "eventful_mc")
BLOCK = "eventful_verdicts"


def load_rows(results: Path) -> list[dict[str, object]]:
    """Every row of every real-weights result file, tagged with its clip, size and file name."""
    rows = []
    for path in sorted(results.glob("eventful_real_*.json")) + sorted(results.glob("eventful_motion_*.json")):
        report = json.loads(path.read_text())
        for result in report.get("results", []):
            if "rows" not in result:
                continue
            for row in result["rows"]:
                rows.append({**row, "clip": result["clip"], "size": result["size"], "file": path.name,
                             "first_frame": result.get("first_frame", 0), "frames": result["frames"]})
    return rows


def verdicts(rows: list[dict[str, object]], clip: str, size: int,
             kinds: tuple[str, ...] = EVENTFUL_KINDS) -> list[dict[str, object]]:
    """`eventful_real.dominance` over every file of `clip` at `size`: per keyframe-and-hold point in 2x-8x
    (K = 2..8), beaten or not by an eventful row of one of `kinds` ("eventful_mc": its held maps moved by the
    global motion), and the best such row, named with its file."""
    here = [row for row in rows if row["clip"] == clip and row["size"] == size]
    holds = {row["label"]: row for row in here if row["kind"] == "keyframe"}  # the same in every file
    contenders = [{**row, "label": f"{row['label']} ({row['file']})"} for row in here if row["kind"] in kinds]
    return [{"clip": clip, "size": size, **verdict}
            for verdict in dominance(list(holds.values()) + contenders, "mac_ratio", kinds=kinds)]


def markdown(table: list[dict[str, object]]) -> str:
    """The verdicts as a markdown table and a count."""
    lines = ["| clip | px | hold | its ratio / r / IoU | beaten | best eventful (file) | its ratio / r / IoU |",
             "| --- | ---: | --- | --- | --- | --- | --- |"]
    for v in table:
        best = ("-" if v["by"] is None
                else f"{v['eventful_ratio']:.2f}x / {v['eventful_r']:.4f} / {v['eventful_iou']:.3f}")
        lines.append(f"| {v['clip']} | {v['size']} | {v['hold'].removeprefix('hold ')} | {v['ratio']:.2f}x / "
                     f"{v['hold_r']:.4f} / {v['hold_iou']:.3f} | {'yes' if v['beaten'] else '**no**'} | {v['by']} "
                     f"| {best} |")
    beaten = sum(v["beaten"] for v in table)
    count = f"{beaten} of {len(table)} keyframe-and-hold points beaten on both mean r and mean IoU"
    return "\n".join(lines) + "\n\n" + count


def held_out_verdicts(chosen: list[dict[str, object]], rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Each verdict of `chosen` (in-sample, with its setting `by` = "label (file)") judged again on the held-out
    `rows`: that setting, from the file of the same name, against the same keyframe-and-hold period there."""
    out, missing = [], []
    for verdict in chosen:
        label, _, file = verdict["by"].rpartition(" (")
        file = file.removesuffix(")")
        here = [row for row in rows if row["clip"] == verdict["clip"] and row["size"] == verdict["size"]]
        hold = next((row for row in here if row["kind"] == "keyframe" and row["label"] == verdict["hold"]), None)
        setting = next((row for row in here if row["file"] == file and row["label"] == label
                        and row["kind"] in EVENTFUL_KINDS), None)
        if hold is None or setting is None:
            missing.append(f"{verdict['clip']} {verdict['size']} px {verdict['hold']}: {label!r} in {file}")
            continue
        beaten = beats(setting, hold)
        out.append({"clip": verdict["clip"], "size": verdict["size"], "first_frame": setting["first_frame"],
                    "frames": setting["frames"], "hold": verdict["hold"], "ratio": hold["mac_ratio"],
                    "hold_r": hold["pearson_mean"], "hold_iou": hold["iou_top10_mean"], "by": verdict["by"],
                    "in_sample_beaten": verdict["beaten"], "beaten": beaten,
                    "eventful_ratio": setting["mac_ratio"], "eventful_r": setting["pearson_mean"],
                    "eventful_iou": setting["iou_top10_mean"]})
    if missing:
        raise SystemExit("--held-out: no held-out row for the setting chosen at " + "; ".join(missing)
                         + " (run it with --start-frame into a file of the same name)")
    return out


def held_out_markdown(table: list[dict[str, object]]) -> str:
    """The held-out verdicts as a markdown table and a count."""
    lines = ["| clip | px | frames | hold | its ratio / r / IoU | setting chosen on the in-sample frames (file) | "
             "its ratio / r / IoU here | beaten (in-sample) |",
             "| --- | ---: | --- | --- | --- | --- | --- | --- |"]
    for v in table:
        first = v["first_frame"]
        lines.append(f"| {v['clip']} | {v['size']} | {first}-{first + v['frames'] - 1} | "
                     f"{v['hold'].removeprefix('hold ')} | {v['ratio']:.2f}x / {v['hold_r']:.4f} / "
                     f"{v['hold_iou']:.3f} | {v['by']} | {v['eventful_ratio']:.2f}x / {v['eventful_r']:.4f} / "
                     f"{v['eventful_iou']:.3f} | {'yes' if v['beaten'] else '**no**'} "
                     f"({'yes' if v['in_sample_beaten'] else 'no'}) |")
    beaten = sum(v["beaten"] for v in table)
    return "\n".join(lines) + f"\n\n{beaten} of {len(table)} points beaten on the held-out frames by the setting " \
        "chosen on the in-sample ones"


def budget_verdicts(rows: list[dict[str, object]], held_rows: list[dict[str, object]], file: str
                    ) -> list[dict[str, object]]:
    """The compute-budget settings of result file `file` (`eventful_real.budget_settings`: per keyframe-and-hold
    point K = 2..8 a `MacBudget` with that point's ratio plus 5 % as its target, in two families of hold / cut
    tests), one verdict per clip and point: of the point's two budget settings, the one that beats the hold point
    on the in-sample `rows` (at least its MAC ratio, higher mean r and higher mean IoU), else or among both the one
    with the higher mean r + IoU, is chosen, then judged by the same rule there and, where `held_rows` has the same
    file, on those frames."""
    def point(source: list[dict[str, object]], clip: str, hold_label: str, label: str | None = None
              ) -> tuple[dict[str, object] | None, list[dict[str, object]]]:
        here = [row for row in source if row["file"] == file and row["clip"] == clip]
        hold = next((row for row in here if row["kind"] == "keyframe" and row["label"] == hold_label), None)
        return hold, [row for row in here if row["kind"] == "eventful" and (label is None or row["label"] == label)]

    out = []
    for clip in sorted({row["clip"] for row in rows if row["file"] == file}):
        for period in range(2, 9):
            prefix = f"budget {budget_target(period):g}x + "
            hold, settings = point(rows, clip, f"hold K={period}")
            settings = [row for row in settings if str(row["label"]).startswith(prefix)]
            if hold is None or not settings:
                continue
            chosen = max(settings, key=lambda row: (beats(row, hold), row["pearson_mean"] + row["iou_top10_mean"]))
            verdict = {"clip": clip, "hold": hold["label"], "setting": chosen["label"], "file": file,
                       "in_sample": {"hold": [hold["mac_ratio"], hold["pearson_mean"], hold["iou_top10_mean"]],
                                     "setting": [chosen["mac_ratio"], chosen["pearson_mean"],
                                                 chosen["iou_top10_mean"]],
                                     "beaten": beats(chosen, hold)}}
            held_hold, held = point(held_rows, clip, hold["label"], chosen["label"])
            if held_hold is not None and held:
                verdict["held_out"] = {"first_frame": held[0]["first_frame"],
                                       "hold": [held_hold["mac_ratio"], held_hold["pearson_mean"],
                                                held_hold["iou_top10_mean"]],
                                       "setting": [held[0]["mac_ratio"], held[0]["pearson_mean"],
                                                   held[0]["iou_top10_mean"]],
                                       "beaten": beats(held[0], held_hold)}
            out.append(verdict)
    return out


def budget_markdown(table: list[dict[str, object]]) -> str:
    """The budget verdicts as a markdown table (ratio / r / IoU) and the counts."""
    def triple(values: list[float]) -> str:
        return f"{values[0]:.2f}x / {values[1]:.4f} / {values[2]:.3f}"

    lines = ["| clip | hold | budget setting (chosen on the in-sample frames) | in sample: hold | setting, beats? | "
             "held out: hold | setting, beats? |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in table:
        inside, outside = v["in_sample"], v.get("held_out")
        held = "- | -" if outside is None else (
            f"{outside['first_frame']}-: {triple(outside['hold'])} | "
            f"{triple(outside['setting'])} {'**yes**' if outside['beaten'] else 'no'}")
        lines.append(f"| {v['clip']} | {v['hold'].removeprefix('hold ')} | {v['setting']} | {triple(inside['hold'])} "
                     f"| {triple(inside['setting'])} {'**yes**' if inside['beaten'] else 'no'} | {held} |")
    judged = [v for v in table if "held_out" in v]
    return "\n".join(lines) + (f"\n\nin sample {sum(v['in_sample']['beaten'] for v in table)} of {len(table)}; "
                               f"held out {sum(v['held_out']['beaten'] for v in judged)} of {len(judged)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--clips", nargs="+", default=["bigbuckbunny", "bikes"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 448, 896])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--update", type=Path, help="a markdown file with an eventful_verdicts block to rewrite")
    parser.add_argument("--held-out", type=Path, metavar="DIR",
                        help="result files of the same names run on other frames: judge each point's chosen "
                             "setting there")
    parser.add_argument("--budget", metavar="FILE",
                        help="a result file of eventful_real.py's budget settings (e.g. eventful_real_224_budget.json):"
                             " one budget per hold point, chosen in sample, judged there and on --held-out")
    args = parser.parse_args(argv)
    if args.held_out is not None and not args.held_out.is_dir():
        parser.error(f"--held-out {args.held_out}: no such directory")
    rows = load_rows(args.results)
    table = [verdict for clip in args.clips for size in args.sizes for verdict in verdicts(rows, clip, size)]
    if not table:
        raise SystemExit(f"no keyframe-and-hold rows for {args.clips} at {args.sizes} under {args.results}")
    text = markdown(table)
    if args.update is not None:  # checked before anything is printed or written
        doc = args.update.read_text()
        head, _, tail = split_block(doc, BLOCK, str(args.update))
        with atomic_file(args.update) as handle:
            handle.write(f"{head}\n{text}\n{tail}".encode())
    print(text)
    plain = [verdict for clip in args.clips for size in args.sizes
             for verdict in verdicts(rows, clip, size, kinds=("eventful",))]
    beaten, beaten_plain = sum(v["beaten"] for v in table), sum(v["beaten"] for v in plain)
    lost_plain = ", ".join(f"{v['clip']} {v['size']} px {v['hold'].removeprefix('hold ')}" for v in plain
                           if not v["beaten"])
    print(f"{beaten_plain} of {len(plain)} without motion-compensated held maps (not beaten then: {lost_plain})")
    report = {"benchmark": "eventful_verdicts", "beaten": beaten, "points": len(table),
              "beaten_without_motion_compensation": beaten_plain, "verdicts": table,
              "verdicts_without_motion_compensation": plain}
    if args.held_out is not None:
        held_rows = load_rows(args.held_out)
        scored = [(clip, size) for clip in args.clips for size in args.sizes
                  if any(row["clip"] == clip and row["size"] == size for row in held_rows)]
        judged = held_out_verdicts([v for v in table if (v["clip"], v["size"]) in scored], held_rows)
        print("\n" + held_out_markdown(judged))
        best = [verdict for clip, size in scored for verdict in verdicts(held_rows, clip, size)]
        print(f"{sum(v['beaten'] for v in best)} of {len(best)} beaten on the held-out frames by the best held-out "
              "setting per point (a choice made on those frames)")
        report.update(held_out=judged, held_out_beaten=sum(v["beaten"] for v in judged),
                      held_out_best=best, held_out_best_beaten=sum(v["beaten"] for v in best))
    if args.budget is not None:
        budget = budget_verdicts(rows, [] if args.held_out is None else load_rows(args.held_out), args.budget)
        if not budget:
            raise SystemExit(f"--budget {args.budget}: no budget settings with hold points in {args.results}")
        print("\n" + budget_markdown(budget))
        report["budget"] = budget
    if args.out is not None:
        write_json_atomically(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
