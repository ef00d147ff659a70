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
