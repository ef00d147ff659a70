"""`--device` / `--dtype` on every model command, and library functions that follow the model's device and dtype.

On a CPU-only machine: each command runs with `--device cpu --dtype bfloat16` and its JSON
report names the device, its name, the dtype and torch; `--device cuda` and a bad `--dtype`
are one line on stderr and exit code 2, before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import frugalvit
from frugalvit.cli.main import main
from frugalvit.cli.options import resolve_device, resolve_dtype
from frugalvit.data import Split
from frugalvit.dvt import dvt_cascade
from frugalvit.ecoformer.cost import model_energy
from frugalvit.models import small_vit
from frugalvit.training import TrainConfig, accuracy, predict, train

BF16 = ["--device", "cpu", "--dtype", "bfloat16"]
VIDEO_TINY = ["--model", "vit_tiny_patch16_224", "--size", "64", "--random-init", "--max-frames", "3",
              "--repeats", "1", "--no-progress"]
DVT_TINY = ["--embed-dim", "16", "--depth", "1", "--heads", "2", "--context-dim", "4", "--epochs", "1",
            "--batch-size", "16", "--no-progress"]
ECO_TINY = ["--teacher-epochs", "1", "--teacher-samples", "32", "--epochs", "1", "--train-samples", "32",
            "--batch-size", "16", "--calibration-images", "4", "--fit-iterations", "1", "--bits", "4",
            "--anchors", "4", "--test-samples", "8", "--no-progress"]


@pytest.fixture()
def tiny_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8), labels=np.arange(60) % 3)
    return path


def assert_device_entries(report: dict, dtype: str = "bfloat16") -> None:
    assert report["device"] == "cpu" and report["device_name"] and report["dtype"] == dtype
    assert report["torch"] == torch.__version__


def test_demo_and_video_in_bfloat16_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", *VIDEO_TINY, *BF16, "--out", str(out)]) == 0
    assert_device_entries(json.loads((out / "report.json").read_text())["settings"])


def test_dvt_train_calibrate_eval_in_bfloat16_on_cpu(tmp_path: Path, tiny_npz: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["dvt", "train", "--data", str(tiny_npz), "--out", str(run), *DVT_TINY, *BF16]) == 0
    config = json.loads((run / "config.json").read_text())
    assert_device_entries(config["device"])
    assert "mixed" in config["device"]["precision"]
    assert all(value.dtype == torch.float32 for value in torch.load(run / "model.pt").values()
               if value.is_floating_point())  # mixed precision: float32 weights
    assert main(["dvt", "train", "--data", str(tiny_npz), "--out", str(run), *DVT_TINY]) == 0  # resumes in float32
    assert main(["dvt", "calibrate", str(run), "--budget", "10M", "--no-progress", *BF16]) == 0
    assert_device_entries(json.loads((run / "thresholds.json").read_text()))
    capsys.readouterr()
    assert main(["dvt", "eval", str(run), "--no-progress", *BF16]) == 0
    assert "on cpu (" in capsys.readouterr().out.split("accuracy")[-1]


def test_ecoformer_finetune_in_bfloat16_on_cpu(tmp_path: Path, tiny_npz: Path) -> None:
    out = tmp_path / "eco"
    assert main(["ecoformer", "finetune", "--data", str(tiny_npz), "--out", str(out), *ECO_TINY, *BF16]) == 0
    results = json.loads((out / "results.json").read_text())
    assert_device_entries(results)
    assert 0 <= results["accuracy"]["ecoformer_finetuned"] <= 1 and results["seconds"] > 0


COMMANDS = {
    "video": lambda out, data: ["video", "bundled:bikes", *VIDEO_TINY, "--out", str(out)],
    "demo": lambda out, data: ["demo", *VIDEO_TINY, "--out", str(out)],
    "dvt train": lambda out, data: ["dvt", "train", "--data", str(data), "--out", str(out), *DVT_TINY],
    "dvt calibrate": lambda out, data: ["dvt", "calibrate", str(out), "--budget", "10M"],
    "dvt eval": lambda out, data: ["dvt", "eval", str(out)],
    "ecoformer finetune": lambda out, data: ["ecoformer", "finetune", "--data", str(data), "--out", str(out),
                                             *ECO_TINY],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("option, fragments", [
    (["--dtype", "float64"], ("--dtype 'float64' is not supported", "bfloat16, float16, float32")),
    (["--device", "meta"], ("--device meta", "only cpu and cuda")),
    (["--device", "gpu0"], ("--device 'gpu0' is not a torch device",)),
    pytest.param(["--device", "cuda"], ("CUDA is not available here; use --device cpu",),
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_bad_device_or_dtype_is_one_line_and_exit_2_before_any_work(
        command: str, option: list[str], fragments: tuple[str, ...], tmp_path: Path, tiny_npz: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main([*COMMANDS[command](out, tiny_npz), *option])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert all(fragment in error[0] for fragment in fragments), error[0]
    assert not out.exists()


def test_options_resolve() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")


def test_library_follows_a_bfloat16_model() -> None:
    """Float32 (and uint8) CPU inputs are moved to the model's dtype: no dtype mismatch anywhere."""
    torch.manual_seed(0)
    images = torch.rand(12, 1, 28, 28)
    split = Split(images, torch.arange(12) % 3)
    vit = small_vit(num_classes=3, embed_dim=24, depth=1).to(torch.bfloat16)
    assert predict(vit, images).dtype == torch.bfloat16
    assert 0 <= accuracy(vit, split) <= 1

    eco = frugalvit.ecoformer(small_vit(num_classes=3, embed_dim=24, depth=1), bits=4, anchors=4)
    eco.to(torch.bfloat16)
    frugalvit.fit_hashes(eco, images[:4], iterations=2)
    assert bool(eco.blocks[0].attn.hash_fitted) and eco.blocks[0].attn.hash_weights.dtype == torch.bfloat16
    assert 0 <= accuracy(eco, split) <= 1
    assert model_energy(eco, images[:1])["total"]["energy_uj"] > 0

    cascade = dvt_cascade(patch_sizes=(14, 7), num_classes=3, embed_dim=16, depth=1, num_heads=2, context_dim=4)
    cascade.to(torch.bfloat16)
    uint8 = (images * 255).to(torch.uint8)
    calibration = cascade.calibrate(uint8, split.labels)
    assert calibration.confidence.shape == (2, 12)
    cascade.set_thresholds([0.953])
    assert cascade.thresholds.dtype == torch.float32 and cascade.thresholds.item() == pytest.approx(0.953)
    assert cascade(images.to(torch.bfloat16)).logits.dtype == torch.bfloat16


def test_training_keeps_float32_weights_and_trains_in_mixed_precision() -> None:
    torch.manual_seed(0)
    split = Split(torch.rand(8, 1, 28, 28), torch.arange(8) % 2)
    config = TrainConfig(epochs=1, batch_size=4, warmup_steps=1)
    with pytest.raises(ValueError, match="float32 weights.*amp_dtype=torch.bfloat16"):
        train(small_vit(num_classes=2, embed_dim=24, depth=1).to(torch.bfloat16), split, config, progress=False)
    for amp_dtype in (torch.bfloat16, torch.float16):
        model = small_vit(num_classes=2, embed_dim=24, depth=1)
        before = model.head.weight.detach().clone()
        train(model, split, config, progress=False, amp_dtype=amp_dtype)
        assert model.head.weight.dtype == torch.float32 and not torch.equal(model.head.weight, before)
