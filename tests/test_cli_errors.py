"""A new user's first hour with the `frugalvit` command: bad input fails at once, in one line, writing nothing.

Every failing command must exit with code 2, print exactly one line on
stderr, and leave `--out` as it was (not created, no stray files).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from frugalvit.cli.main import main
from frugalvit.models import load_timm_model

TINY = ["--model", "vit_tiny_patch16_224", "--size", "64", "--no-progress"]
VIDEO = ["video", "bundled:carphone_pristine", *TINY, "--random-init", "--max-frames", "3"]


def assert_one_line_error(code: int, capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    """Exit code 2 and exactly one line on stderr containing every fragment; returns that line."""
    error = capsys.readouterr().err
    assert code == 2, error
    lines = error.strip().splitlines()
    assert len(lines) == 1, error
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory nobody may create files in: chmod for normal users, /proc for root (root ignores modes)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        return locked
    if Path("/proc/self").is_dir():
        return Path("/proc")
    pytest.skip("no unwritable directory available to root on this system")


@pytest.mark.parametrize("case", ["file", "parent_file", "unwritable", "report_is_directory"])
def test_video_bad_out_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setattr("frugalvit.cli.video.load_frames",
                        lambda *args, **kwargs: pytest.fail("decoded the clip before checking --out"))
    if case == "file":
        out = tmp_path / "f"
        out.write_text("x\n")
        expected = "not a directory"
    elif case == "parent_file":
        (tmp_path / "f").write_text("x\n")
        out = tmp_path / "f" / "sub"
        expected = "is a file"
    elif case == "unwritable":
        out = unwritable_directory(tmp_path) / "frugalvit-out"
        expected = "writ"
    else:
        out = tmp_path / "out"
        (out / "report.json").mkdir(parents=True)
        expected = "is a directory"
    before = sorted(tmp_path.rglob("*"))
    code = main([*VIDEO, "--out", str(out)])
    assert_one_line_error(code, capsys, expected, "--out")
    assert sorted(tmp_path.rglob("*")) == before


def test_report_is_all_or_nothing_with_normal_permissions(tmp_path: Path) -> None:
    """When report.json cannot be replaced, report.png is not written either and no temporary file remains."""
    from frugalvit.video.compare import FrameRecord, summarize
    from frugalvit.video.report import write_report

    records = [FrameRecord(index, 1.0, 0.5, 2.0, 1.0, 1.0, 0.0, True, index == 0, 0.5) for index in range(3)]
    summary = summarize(records, 1024)
    settings = {"model": "m", "size": 64, "policy": "fraction:0.25", "weights": "random"}
    blocked = tmp_path / "blocked"
    (blocked / "report.json" / "keep").mkdir(parents=True)  # a non-empty directory: no file can replace it
    with pytest.raises(OSError):
        write_report(blocked, settings, records, summary)
    assert sorted(p.name for p in blocked.iterdir()) == ["report.json"]

    old_umask = os.umask(0o022)
    try:
        json_path, png_path = write_report(tmp_path / "new" / "report", settings, records, summary)
    finally:
        os.umask(old_umask)
    for path in (json_path, png_path):
        assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["report.json", "report.png"]


@pytest.fixture()
def tiny_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=rng.integers(0, 255, (30, 28, 28)).astype(np.uint8), labels=np.arange(30) % 3)
    return path


@pytest.mark.parametrize("case", ["data", "teacher_missing", "teacher_text", "out_file"])
def test_ecoformer_finetune_bad_input_leaves_no_out(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    tiny_npz: Path, case: str) -> None:
    out = tmp_path / "run"
    args = ["ecoformer", "finetune", "--data", str(tiny_npz), "--out", str(out), "--no-progress",
            "--teacher-epochs", "1", "--epochs", "1"]
    expected = {"data": "nothing.npz", "teacher_missing": "no such teacher",
                "teacher_text": "not a PyTorch/safetensors checkpoint", "out_file": "not a directory"}[case]
    if case == "data":
        args[args.index(str(tiny_npz))] = str(tmp_path / "nothing.npz")
    elif case == "teacher_missing":
        args += ["--teacher", str(tmp_path / "missing.pt")]
    elif case == "teacher_text":
        (tmp_path / "teacher.pt").write_text("these are not weights\n")
        args += ["--teacher", str(tmp_path / "teacher.pt")]
    else:
        out.write_text("x\n")
    assert_one_line_error(main(args), capsys, expected)
    assert (out.is_file() if case == "out_file" else not out.exists())


def test_video_missing_optional_dependency(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr("frugalvit.cli.video.load_timm_model",
                        lambda *args, **kwargs: pytest.fail("loaded a model before checking dependencies"))
    out = tmp_path / "out"
    code = main([*VIDEO, "--out", str(out)])
    assert_one_line_error(code, capsys, "matplotlib", "pip install 'frugalvit[video]'")
    assert not out.exists()


def test_offline_pretrained_request_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No reachable hub and no cached weights: the one-line fix within seconds, without asking timm to download."""
    monkeypatch.setenv("HF_ENDPOINT", "https://frugalvit-offline.invalid")  # .invalid never resolves
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    real_create = timm.create_model

    def create_model(*args: object, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            pytest.fail("asked timm to download despite no reachable hub")
        return real_create(*args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    out = tmp_path / "out"
    started = time.perf_counter()
    code = main(["video", "bundled:carphone_pristine", *TINY, "--out", str(out)])
    assert time.perf_counter() - started < 5.0
    assert_one_line_error(code, capsys, "--checkpoint", "--random-init")
    assert not out.exists()


@pytest.mark.parametrize("content, expected", [
    (b"hello, I am text\n", "looks like text"),
    (b"", "empty file"),
    (b"\x00\x17\xfe\x01" * 40, "160 bytes of unrecognised binary data"),
    ("zip", "zip archive"),
])
def test_checkpoint_that_is_not_one_says_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   content: bytes | str, expected: str) -> None:
    checkpoint = tmp_path / "weights.pth"
    if content == "zip":
        with zipfile.ZipFile(checkpoint, "w") as archive:
            archive.writestr("notes.txt", "not weights")
    else:
        checkpoint.write_bytes(content)
    out = tmp_path / "out"
    code = main(["video", "bundled:carphone_pristine", *TINY, "--checkpoint", str(checkpoint), "--out", str(out)])
    line = assert_one_line_error(code, capsys, "not a PyTorch/safetensors checkpoint", expected, "expected")
    assert "vit_tiny_patch16_224" in line
    assert not out.exists()


def test_checkpoint_of_another_model_says_it_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "weights.pth"
    torch.save({"something": torch.zeros(3)}, checkpoint)
    code = main(["video", "bundled:carphone_pristine", *TINY, "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys, "a PyTorch checkpoint, but it cannot be loaded into vit_tiny_patch16_224")


def test_random_init_is_seeded_without_touching_global_state() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_timm_model("vit_tiny_patch16_224", 32, random_init=True, seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    again = load_timm_model("vit_tiny_patch16_224", 32, random_init=True, seed=0)
    other = load_timm_model("vit_tiny_patch16_224", 32, random_init=True, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(first.patch_embed.proj.weight, other.patch_embed.proj.weight)


def test_video_is_reproducible_and_reports_speed_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same seed, same fidelity numbers; the speed-up comes with min/median/max over replays."""
    reports = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1000 + ord(name))  # global state must not matter
        assert main([*VIDEO, "--policy", "topr:8", "--repeats", "2", "--out", str(tmp_path / name)]) == 0
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    fidelity = [[(f["cosine"], f["top1_agrees"], f["eventful_gmacs"]) for f in r["frames"]] for r in reports]
    assert fidelity[0] == fidelity[1]
    summary, settings = reports[0]["summary"], reports[0]["settings"]
    assert settings["seed"] == 0 and settings["repeats"] == 2 and summary["repeats"] == 2
    assert summary["speedup_min"] <= summary["speedup"] <= summary["speedup_max"]
    assert summary["speedup_after_first_min"] <= summary["speedup_after_first"] <= summary["speedup_after_first_max"]
    assert "min" in capsys.readouterr().out


def test_ecoformer_help_describes_only_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["ecoformer", "--help"])
    text = capsys.readouterr().out
    assert "finetune" in text and "convert, fit, fine-tune" not in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "convert, fit, fine-tune" not in capsys.readouterr().out


def test_ecoformer_refit_shows_progress(tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash fitting shows a progress bar in the CLI, the re-fits during fine-tuning included."""
    import frugalvit.cli.ecoformer as command

    calls: list[object] = []
    real_fit = command.fit_hashes

    def fit_hashes(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("progress", False))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(command, "fit_hashes", fit_hashes)
    code = main(["ecoformer", "finetune", "--data", str(tiny_npz), "--out", str(tmp_path / "run"),
                 "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "16", "--calibration-images", "4",
                 "--fit-iterations", "1", "--bits", "4", "--anchors", "4", "--refit-every", "1",
                 "--test-samples", "4", "--teacher-samples", "16", "--train-samples", "16"])
    assert code == 0
    assert calls == [True, True]


def test_cached_pretrained_weights_load_without_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights already in the hub cache load offline at once (the hub would retry the network first)."""
    import huggingface_hub

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    cached = tmp_path / "pytorch_model.bin"
    torch.save(source.state_dict(), cached)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kwargs: str(cached) if filename == cached.name else None)
    monkeypatch.setattr("frugalvit.models._pretrained_unavailable",
                        lambda name: pytest.fail("checked the network although the weights are cached"))
    model = load_timm_model("vit_tiny_patch16_224")
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight) and not model.training


@pytest.mark.parametrize("flags, expected", [
    (["--hold-share", "0.2"], "needs a larger --cut-share"),
    (["--hold-share", "0.6", "--cut-share", "0.5"], "needs a larger --cut-share"),
    (["--hold-share", "-0.1", "--cut-share", "0.5"], "--hold-share must lie in [0, 1]"),
    (["--cut-share", "2"], "--cut-share must lie in [0, 1]"),
    (["--capture", "--policy", "relative:0.2"], "--capture needs a fixed-size policy"),
    (["--policy", "topr:1000"], "more tokens than the 17"),  # 4x4 patches and the class token at 64 px
    (["--budget", "inf"], "--budget must be a finite saving"),
    (["--incremental-max-fraction", "5"], "--incremental-max-fraction must lie in [0, 1]"),
    (["--size", "72"], "multiple of vit_tiny_patch16_224's patch size 16"),
    (["--compile", "--policy", "threshold:0.2"], "--compile needs a fixed-size policy"),
])
def test_video_bad_hold_settings_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                                      expected: str) -> None:
    monkeypatch.setattr("frugalvit.cli.video.load_frames",
                        lambda *args, **kwargs: pytest.fail("decoded the clip before checking the settings"))
    out = tmp_path / "out"
    assert_one_line_error(main([*VIDEO, *flags, "--out", str(out)]), capsys, expected)
    assert not out.exists()


def test_hold_share_that_is_not_a_number_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*VIDEO, "--cut-share", "0.5", "--hold-share", "abc", "--out", "unused"])
    assert exit_info.value.code == 2
    assert "expected a share in [0, 1] or 'none', got 'abc'" in capsys.readouterr().err.strip().splitlines()[-1]


def test_video_hold_share_runs_and_reports_held_frames(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["video", "bundled:bikes", *TINY, "--random-init", "--max-frames", "8", "--repeats", "1",
                 "--policy", "topr:2", "--cut-share", "0.9", "--hold-share", "0.05", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["hold_share"] == 0.05
    held = [frame["held"] for frame in report["frames"]]
    assert report["summary"]["held_frames"] == sum(held) and sum(held) >= 1
    assert not any(frame["held"] and frame["full_update"] for frame in report["frames"])


def test_video_capture_runs_and_is_reported(tmp_path: Path) -> None:
    """`--capture` reaches the eventful model (on the CPU: the sync-free frame, no graph) and the report."""
    out = tmp_path / "out"
    assert main(["video", "bundled:bikes", *TINY, "--random-init", "--max-frames", "4", "--repeats", "1",
                 "--policy", "fraction:0.25", "--token-selection", "shared", "--capture", "--out", str(out)]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["capture"] is True and settings["token_selection"] == "shared"


def test_video_compile_runs_compiled_and_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile` compiles the eventful frame (sync-free, whole) and the timed dense backbone; the report says so.
    Dynamo's eager backend keeps this fast (inductor itself: test_eventful_capture.py)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, **options, backend="eager"))
    out = tmp_path / "out"
    assert main(["video", "bundled:bikes", *TINY, "--random-init", "--max-frames", "4", "--repeats", "1",
                 "--policy", "fraction:0.25", "--cut-share", "0.6", "--hold-share", "0.3", "--compile",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["compiled"] is True and "compiled with torch.compile" in report["settings"]["baseline"]
    assert report["summary"]["mac_ratio"] > 1  # counted eagerly, as without --compile
    torch._dynamo.reset()


def test_video_compile_without_a_cpp_compiler_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("frugalvit.cli.video.shutil.which", lambda name: None)
    monkeypatch.setattr("frugalvit.cli.video.load_frames",
                        lambda *args, **kwargs: pytest.fail("decoded the clip before checking the compiler"))
    out = tmp_path / "out"
    assert_one_line_error(main([*VIDEO, "--compile", "--policy", "fraction:0.25", "--out", str(out)]), capsys,
                          "--compile on the CPU needs a C++ compiler")
    assert not out.exists()


def test_video_attention_rows_is_passed_on_and_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--attention-rows changed` (and `--token-selection shared`) reaches the eventful model (its attention takes the "rows" path) and the report;
    an unknown value is an argument error (exit 2) before any work."""
    out = tmp_path / "out"
    assert main(["video", "bundled:bikes", *TINY, "--random-init", "--max-frames", "3", "--repeats", "1",
                 "--policy", "topr:2", "--attention-rows", "changed", "--token-selection", "shared",
                 "--out", str(out)]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["attention_rows"] == "changed" and settings["token_selection"] == "shared"
    for option in ("--attention-rows", "--token-selection"):
        with pytest.raises(SystemExit) as exit_info:
            main([*VIDEO, option, "some", "--out", str(tmp_path / "other")])
        assert exit_info.value.code == 2
        assert "invalid choice: 'some'" in capsys.readouterr().err
        assert not (tmp_path / "other").exists()


def test_a_new_report_does_not_keep_an_earlier_runs_animation(tmp_path: Path) -> None:
    """A saliency run's side-by-side GIF does not stay beside a later run's report in the same --out."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "side_by_side.gif").write_bytes(b"GIF89a an earlier run")
    assert main([*VIDEO, "--repeats", "1", "--out", str(out)]) == 0
    assert (out / "report.json").is_file() and not (out / "side_by_side.gif").exists()


def test_ecoformer_run_resumes_only_with_its_own_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          tiny_npz: Path) -> None:
    """An existing --out with other settings is an error, not its old checkpoints returned as this run's models;
    --lr and --top-l are checked before the teacher trains."""
    out = tmp_path / "run"
    args = ["ecoformer", "finetune", "--data", str(tiny_npz), "--out", str(out), "--no-progress", "--teacher-epochs",
            "1", "--epochs", "1", "--batch-size", "16", "--calibration-images", "6", "--fit-iterations", "1",
            "--bits", "8", "--anchors", "4", "--test-samples", "6"]
    for flags, expected in ((["--lr", "nan"], "lr must be a finite number"), (["--top-l", "0"], "--top-l must lie")):
        assert_one_line_error(main([*args, *flags]), capsys, expected)
        assert not out.exists()
    assert main(args) == 0
    capsys.readouterr()
    assert_one_line_error(main([*args, "--lr", "0.05"]), capsys, "holds a run with different settings")
    assert main(args) == 0  # the same options resume it


@pytest.mark.parametrize("case", ["text", "beyond"])
def test_an_unreadable_clip_fails_before_the_model_is_built(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setattr("frugalvit.cli.video._load_model",
                        lambda *args, **kwargs: pytest.fail("built the model before checking the clip"))
    if case == "text":
        clip = tmp_path / "clip.mp4"
        clip.write_text("not a video\n")
        args, expected = ["video", str(clip)], "cannot open as video"
    else:  # bigbuckbunny has 132 frames
        args, expected = ["video", "bundled:bigbuckbunny", "--start-frame", "500"], "has 132 frames"
    code = main([*args, *TINY, "--random-init", "--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys, expected)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_its_own_classes_loads_its_head_strictly(tmp_path: Path) -> None:
    """timm drops a head whose class count differs from its config's and loads the rest loosely: a trained
    10-class checkpoint must come back with its head, and one of another depth must be refused."""
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2)
    path = tmp_path / "c10.pth"
    torch.save(source.state_dict(), path)
    model = load_timm_model("vit_tiny_patch16_224", 32, path, num_classes=10, depth=2)
    assert torch.equal(model.head.weight, source.head.weight)
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_timm_model("vit_tiny_patch16_224", 32, path, num_classes=10, depth=4)
    features_only = load_timm_model("vit_tiny_patch16_224", 32, path, num_classes=0, depth=2)
    assert torch.equal(features_only.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize("case, message", [
    ("float255", "floats in [0, 1]"), ("uint16", "floats in [0, 1]"), ("rgba", "1 or 3 channels"),
    ("fractional_labels", "whole numbers"),
])
def test_npz_data_that_would_be_misread_is_refused(tmp_path: Path, case: str, message: str) -> None:
    from frugalvit.data import load_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 8, 8)).astype(np.uint8)
    labels = np.arange(20) % 2
    if case == "float255":
        images = images.astype(np.float32)
    elif case == "uint16":
        images = images.astype(np.uint16) * 256
    elif case == "rgba":
        images = rng.integers(0, 255, (20, 8, 8, 4)).astype(np.uint8)
    else:
        labels = labels + 0.7
    path = tmp_path / "d.npz"
    np.savez(path, images=images, labels=labels)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_dataset(str(path))
    np.savez(path, images=rng.random((20, 8, 8, 3)).astype(np.float32), labels=np.arange(20.0) % 2)
    assert load_dataset(str(path)).image_shape == (3, 8, 8)  # floats in [0, 1] and whole float labels are fine


def test_image_folder_skips_hidden_directories(tmp_path: Path) -> None:
    from PIL import Image

    from frugalvit.data import load_dataset

    for name in ("cat", "dog", ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
        for index in range(6):
            Image.new("RGB", (8, 8), (index * 10, 0, 0)).save(tmp_path / name / f"{index}.png")
    assert load_dataset(str(tmp_path), 8).num_classes == 2
