"""`frugalvit ecoformer finetune` end to end on a tiny .npz data set, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from frugalvit.cli.main import main


@pytest.fixture()
def tiny_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    images = rng.integers(0, 60, (60, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):  # a bright block whose position gives the class
        images[index, 9 * label:9 * label + 9, :9] = 255
    path = tmp_path / "tiny.npz"
    np.savez(path, images=images, labels=labels)
    return path


def test_finetune_command_runs_and_reports(tiny_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["ecoformer", "finetune", "--data", str(tiny_npz), "--out", str(out), "--teacher-epochs", "1",
            "--epochs", "1", "--batch-size", "16", "--calibration-images", "6", "--fit-iterations", "2", "--control",
            "--bits", "8", "--anchors", "8", "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) >= {"softmax", "ecoformer_finetuned"}
    energy = results["energy_per_image"]
    assert energy["ecoformer"]["total"]["energy_uj"] > 0 and "attention_layers_saving" in energy
    assert (out / "ecoformer.pt").is_file() and (out / "teacher.pt").is_file()
    assert not list(out.rglob("*.tmp"))
    state = torch.load(out / "ecoformer.pt", weights_only=False)
    assert bool(state["model"]["blocks.0.attn.hash_fitted"])
    assert "test accuracy" in capsys.readouterr().out

    again = tmp_path / "again"
    assert main(args[:4] + ["--out", str(again), "--teacher", str(out / "teacher.pt")] + args[6:]) == 0


@pytest.mark.parametrize("extra, message", [(["--bits", "0"], "bits"), (["--anchors", "100000"], "anchors"),
                                            (["--epochs", "0"], "epochs"), (["--teacher", "missing.pt"], "missing.pt")])
def test_finetune_command_bad_input(tiny_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    extra: list[str], message: str) -> None:
    args = ["ecoformer", "finetune", "--data", str(tiny_npz), "--out", str(tmp_path / "bad"), "--no-progress"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
