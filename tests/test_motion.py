"""Global motion by phase correlation and motion-compensated maps (`frugalvit.video.motion`)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from frugalvit.video.decode import bundled_clip_path, load_frames
from frugalvit.video.motion import global_shift, shift_maps


def textured(seed: int, side: int = 112) -> torch.Tensor:
    """A smooth random RGB image (1, 3, side, side): blurred noise, like natural texture."""
    noise = torch.rand(1, 3, side // 4, side // 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=(side, side), mode="bicubic", align_corners=False)


def crop(image: torch.Tensor, top: int, left: int, side: int) -> torch.Tensor:
    return image[..., top:top + side, left:left + side]


@pytest.mark.parametrize("dy, dx", [(0, 0), (5, 0), (0, -7), (-12, 9), (17, 16)])
def test_recovers_a_known_translation(dy: int, dx: int) -> None:
    big = textured(0)
    reference = crop(big, 24, 24, 64)
    current = crop(big, 24 - dy, 24 - dx, 64)  # current[y, x] = reference[y - dy, x - dx]
    assert global_shift(reference, current).tolist() == [[dy, dx]]


def test_batches_are_independent_and_any_normalisation_works() -> None:
    big = textured(1)
    reference = torch.cat([crop(big, 24, 24, 64), crop(big, 30, 20, 64)])
    current = torch.cat([crop(big, 21, 28, 64), crop(big, 30, 20, 64)])
    assert global_shift(reference, current).tolist() == [[3, -4], [0, 0]]
    # brightness and contrast do not move the peak; nor do grey (B, H, W) inputs or half precision
    assert global_shift(reference * 0.5 + 0.2, current * 2.0 - 1.0).tolist() == [[3, -4], [0, 0]]
    assert global_shift(reference.mean(1), current.mean(1)).tolist() == [[3, -4], [0, 0]]
    assert global_shift(reference.bfloat16(), current.bfloat16()).tolist() == [[3, -4], [0, 0]]


def test_shift_maps_moves_by_whole_pixels_and_replicates_edges() -> None:
    maps = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).reshape(2, 1, 5, 6)
    shift = torch.tensor([[2, -1], [0, 0]])
    moved = shift_maps(maps, shift)
    expected = torch.empty_like(maps[0])
    for y in range(5):
        for x in range(6):
            expected[0, y, x] = maps[0, 0, min(max(y - 2, 0), 4), min(max(x + 1, 0), 5)]
    assert torch.equal(moved[0], expected)
    assert torch.equal(moved[1], maps[1])
    assert shift_maps(maps.half(), shift).dtype == torch.float16


def test_moving_the_reference_by_the_measured_shift_reproduces_the_current_frame() -> None:
    big = textured(2)
    reference, current = crop(big, 24, 24, 64), crop(big, 30, 15, 64)  # content moved 6 px up, 9 px right
    shift = global_shift(reference, current)
    assert shift.tolist() == [[-6, 9]]
    moved = shift_maps(reference, shift)
    assert torch.equal(moved[..., :58, 9:], current[..., :58, 9:])  # exact where the content was in view
    assert not torch.equal(moved, current)  # the strips that moved into view repeat the edge


def test_bad_shapes_are_one_clear_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        global_shift(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, H, W\)"):
        global_shift(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"shift \(B, 2\)"):
        shift_maps(torch.zeros(2, 1, 8, 8), torch.zeros(1, 2, dtype=torch.long))


def test_finds_the_camera_pan_of_a_real_clip() -> None:
    """bikes.mp4 opens with the camera panning ~15-17 px per frame (at 224 px) downwards; Big Buck Bunny's camera
    stands still while the rabbit moves."""
    bikes = load_frames(bundled_clip_path("bikes"), 224, max_frames=4)
    shifts = global_shift(bikes[:-1], bikes[1:])
    assert ((shifts[:, 0] >= 13) & (shifts[:, 0] <= 18)).all() and (shifts[:, 1].abs() <= 1).all()
    bunny = load_frames(bundled_clip_path("bigbuckbunny"), 224, max_frames=4)
    assert global_shift(bunny[:-1], bunny[1:]).abs().max() == 0


def test_fractional_shifts_round_to_the_nearest_pixel() -> None:
    """A shift scaled for a smaller map is fractional: 0.9 moves one pixel, as 1 does (not 0, truncated)."""
    maps = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(shift_maps(maps, torch.tensor([[0.9, -0.9]])), shift_maps(maps, torch.tensor([[1, -1]])))
    torch.testing.assert_close(shift_maps(maps, torch.tensor([[1.9, 0.2]])), shift_maps(maps, torch.tensor([[2, 0]])))
