"""Glance and focus with trained models: box regression targets, object-sized crops (uint8 and float, slicing
and gathering), each stage's input, real early exit with the located boxes regrouped, costs, errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from frugalvit.cost import CostCounter
from frugalvit.dvt import BoxLocator, GlanceFocusCascade, crop_around, crop_boxes, dvt_stage
from frugalvit.dvt.cascade import resize_images
from frugalvit.dvt.focus import squares_by_gather, squares_by_slicing

ARCH = dict(patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)


def _cascade(later: bool = True, conv_stem: tuple[int, ...] = ()) -> GlanceFocusCascade:
    torch.manual_seed(0)
    glance, focus = dvt_stage(16, conv_stem=conv_stem, **ARCH), dvt_stage(24, conv_stem=conv_stem, **ARCH)
    full = dvt_stage(40, conv_stem=conv_stem, **ARCH)
    return GlanceFocusCascade(glance, BoxLocator(32, 4, hidden=16), focus, input_size=40, crop_sides=(8, 16, 40),
                              margin=1.5, later=(full,) if later else ()).eval()


def test_box_targets_round_trip_to_pixels_and_the_loss_is_l1() -> None:
    top, left, size = torch.tensor([10, 0]), torch.tensor([20, 30]), torch.tensor([40, 10])
    target = BoxLocator.target(top, left, size, input_size=100)
    torch.testing.assert_close(target[0], torch.tensor([0.3, 0.4, torch.log(torch.tensor(0.4))]))
    centers, sides = BoxLocator.to_pixels(target, 100)
    torch.testing.assert_close(centers, torch.tensor([[30.0, 40.0], [5.0, 35.0]]))
    torch.testing.assert_close(sides, torch.tensor([40.0, 10.0]))
    assert BoxLocator.loss(target + torch.tensor([0.1, 0.0, -0.2]), target).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="built for 4 patch tokens"):
        BoxLocator(8, 4)(torch.randn(2, 1 + 9, 8))


def test_squares_by_slicing_equal_squares_by_gather() -> None:
    images = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8)
    origin = torch.tensor([[0, 0], [3, 11], [12, 12], [7, 0], [0, 9]])
    torch.testing.assert_close(squares_by_slicing(images, origin, 8), squares_by_gather(images, origin, 8),
                               rtol=0, atol=0)
    assert squares_by_slicing(images[:0], origin[:0], 8).shape == (0, 3, 8, 8)


def test_slicing_a_subset_channels_last_gives_the_same_squares_and_crops() -> None:
    """Cutting rows of the batch in place (no copy of their whole images) and in channels-last layout (the fast
    uint8 resize) changes no value: squares, and crops resized as uint8, equal those of the subset itself."""
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    rows = torch.tensor([4, 1, 3])
    origin = torch.tensor([[0, 0], [3, 11], [12, 12]])
    squares = squares_by_slicing(images, origin, 8, rows, channels_last=True)
    assert squares.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(squares, squares_by_gather(images[rows], origin, 8), rtol=0, atol=0)
    centers = torch.tensor([[10.0, 4.0], [2.0, 17.0], [15.0, 15.0]])
    for side, size in ((12, 8), (8, 8), (6, 10)):
        torch.testing.assert_close(crop_around(images, centers, side, size, rows=rows),
                                   crop_around(images[rows], centers, side, size), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one \\(y, x\\) centre per cropped image, shape \\(3, 2\\)"):
        crop_around(images, centers[:2], 8, 8, rows=rows)


def test_uint8_crops_come_back_as_floats_within_one_grey_level_of_the_float_path() -> None:
    images = torch.randint(0, 256, (4, 3, 30, 30), dtype=torch.uint8)
    centers = torch.tensor([[15.0, 15.0], [3.0, 27.0], [20.0, 8.0], [29.0, 29.0]])
    from_uint8 = crop_around(images, centers, side=20, size=12, dtype=torch.float32)
    from_float = crop_around(images.float() / 255, centers, side=20, size=12)
    assert from_uint8.dtype == torch.float32 and from_uint8.shape == (4, 3, 12, 12)
    assert (from_uint8 - from_float).abs().max().item() <= 1.01 / 255


def test_crop_boxes_uses_the_smallest_side_that_holds_each_box() -> None:
    images = torch.rand(4, 3, 32, 32)
    centers = torch.tensor([[16.0, 16.0], [5.0, 5.0], [20.0, 12.0], [16.0, 16.0]])
    sides = torch.tensor([6.0, 8.0, 9.5, 100.0])  # -> 8, 8, 16, and the largest choice (32) for none that holds
    crops = crop_boxes(images, centers, sides, size=8, choices=(32, 8, 16))
    for index, side in enumerate((8, 8, 16, 32)):
        torch.testing.assert_close(crops[index], crop_around(images[index:index + 1], centers[index:index + 1],
                                                             side, 8)[0])
    as_uint8 = crop_boxes((images * 255).round().to(torch.uint8), centers, sides, 8, (8, 16, 32), torch.float64)
    assert as_uint8.dtype == torch.float64 and (as_uint8 - crops.double()).abs().max().item() < 1.6 / 255
    with pytest.raises(ValueError, match="one side per image"):
        crop_boxes(images, centers, sides[:2], 8, (8,))
    with pytest.raises(ValueError, match="must not be empty"):
        crop_boxes(images, centers, sides, 8, ())


@pytest.mark.parametrize("conv_stem", [(), (4,)])
def test_each_stage_sees_its_view_and_early_exit_regroups_the_boxes(conv_stem: tuple[int, ...]) -> None:
    cascade = _cascade(conv_stem=conv_stem)
    images = torch.randint(0, 256, (7, 3, 40, 40), dtype=torch.uint8)
    as_float = images.float() / 255
    with torch.no_grad():
        tokens = cascade.glance.forward_features(resize_images(as_float, (16, 16)))
        glance = cascade.glance.forward_head(tokens)
        centers, sides = BoxLocator.to_pixels(cascade.locator(tokens), 40)
        focus = cascade.focus(crop_boxes(as_float, centers, sides * 1.5, 24, (8, 16, 40)))
        full = cascade.later[0](as_float)
        stages = cascade.forward_all(as_float)
        for got, expected in zip(stages, (glance, focus, full)):
            torch.testing.assert_close(got, expected)
        stages_uint8 = cascade.forward_all(images)  # stored images: resized and cropped as uint8
        for got, expected in zip(stages_uint8, stages):
            torch.testing.assert_close(got, expected, atol=0.05, rtol=0)
        # real early exit: thresholds that send some samples to each stage; each keeps its own box
        confidence = [logits.softmax(-1).amax(-1) for logits in stages]
        first = float(confidence[0].median())
        thresholds = [first, float(confidence[1][confidence[0] < first].median())]
        out = cascade(as_float, thresholds=thresholds)
    exits = out.exit_stage
    assert set(exits.tolist()) >= {0, 1}
    for index in range(7):
        torch.testing.assert_close(out.logits[index], stages[int(exits[index])][index])
    with torch.no_grad():  # without early exit's host round trips: the same answers
        every = cascade.forward_every_stage(as_float, thresholds)
    assert every.exit_stage.tolist() == exits.tolist()
    torch.testing.assert_close(every.logits, out.logits)


def test_costs_add_a_look_per_stage_and_run_on_less_data_when_samples_leave() -> None:
    cascade = _cascade()
    costs = cascade.stage_macs()
    with torch.no_grad(), CostCounter() as glance:
        cascade.locator(cascade.glance.forward_features(torch.zeros(1, 3, 16, 16)))
        cascade.glance.forward_head(cascade.glance.forward_features(torch.zeros(1, 3, 16, 16)))
    with torch.no_grad(), CostCounter() as focus:
        cascade.focus(torch.zeros(1, 3, 24, 24))
    with torch.no_grad(), CostCounter() as full:
        cascade.later[0](torch.zeros(1, 3, 40, 40))
    assert costs[1] - costs[0] == focus.macs and costs[2] - costs[1] == full.macs
    # the glance counted once for its tokens (the locator and the head share them)
    with torch.no_grad(), CostCounter() as tokens_only:
        cascade.glance.forward_features(torch.zeros(1, 3, 16, 16))
    assert costs[0] == glance.macs - tokens_only.macs
    two = _cascade(later=False)
    assert two.stage_macs() == costs[:2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_glance_focus_runs_in_half_precision_on_the_cpu(dtype: torch.dtype) -> None:
    cascade = _cascade().to(dtype)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        stages = cascade.forward_all(cascade.prepare_input(images))
        out = cascade(images, thresholds=[0.5, 0.5])
    assert all(logits.dtype == dtype and torch.isfinite(logits).all() for logits in stages)
    assert torch.isfinite(out.logits).all()


def test_glance_focus_errors_name_the_problem() -> None:
    torch.manual_seed(0)
    glance, focus = dvt_stage(16, **ARCH), dvt_stage(24, **ARCH)
    locator = BoxLocator(32, 4)
    with pytest.raises(ValueError, match="must not exceed the cascade's input_size"):
        GlanceFocusCascade(glance, locator, focus, input_size=20, crop_sides=(8,))
    with pytest.raises(ValueError, match="crop_sides must be sides"):
        GlanceFocusCascade(glance, locator, focus, input_size=40, crop_sides=(8, 41))
    with pytest.raises(ValueError, match="margin must be > 0"):
        GlanceFocusCascade(glance, locator, focus, input_size=40, crop_sides=(8,), margin=0)
    gray = dvt_stage(24, **{**ARCH, "in_chans": 1})
    with pytest.raises(ValueError, match="same image channels"):
        GlanceFocusCascade(glance, locator, gray, input_size=40, crop_sides=(8,))
    cascade = GlanceFocusCascade(glance, locator, focus, input_size=40, crop_sides=(8,))
    with pytest.raises(ValueError, match="needs the glance's located boxes"):
        cascade.run_stage(1, torch.rand(2, 3, 40, 40), None, False)
    with pytest.raises(ValueError, match="expected images of shape"):
        cascade(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8, torch.bfloat16])
def test_crops_by_matrices_equal_the_per_side_crops(dtype: torch.dtype) -> None:
    """The sync-free crop path used off the CPU (each crop's anti-aliased resize as two batched matrix
    products) gives the per-side path's crops: to float32 rounding for float images, within one grey level
    for uint8 ones (resized as uint8 on the CPU); sides equal to the output size (a plain cut) and the
    whole image included; the cascade's kept weight table gives the same."""
    from frugalvit.dvt.focus import crop_weight_table, crops_by_matrices, crops_by_side

    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(7, 3, 32, 32, generator=generator) * 255).round().to(dtype)
    centers = torch.rand(7, 2, generator=generator) * 32
    centers[0] = torch.tensor([0.0, 31.0])  # a crop moved inside at two edges
    options = (8, 12, 16, 32)
    which = torch.tensor([0, 2, 1, 3, 0, 1, 2])
    out = torch.float32 if dtype == torch.uint8 else dtype  # as `crop_boxes` asks: float images keep theirs
    by_side = crops_by_side(images, centers, which, options, 12, out).float()
    by_matrices = crops_by_matrices(images, centers, which, options, 12, torch.float32)
    kept = crops_by_matrices(images, centers, which, options, 12, torch.float32, crop_weight_table(options, 32, 12))
    torch.testing.assert_close(kept, by_matrices, rtol=0, atol=0)
    # uint8: [0, 1], one grey level; float: the 0-255 values, float32 rounding (bfloat16: its own rounding)
    tolerance = {torch.uint8: 1 / 255 + 1e-6, torch.bfloat16: 2.0}.get(dtype, 1e-3)
    torch.testing.assert_close(by_matrices, by_side, rtol=0, atol=tolerance)
    assert by_matrices.dtype == torch.float32 and by_matrices.shape == (7, 3, 12, 12)
    assert crops_by_matrices(images, centers, which, options, 12, torch.bfloat16).dtype == torch.bfloat16


def test_crops_by_matrices_in_half_precision_stay_within_its_rounding() -> None:
    """For a float16 / bfloat16 output the crops are computed in it (tensor cores off the CPU): within two of
    its rounding steps of the float32 crops."""
    from frugalvit.dvt.focus import crops_by_matrices

    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    centers, which = torch.rand(6, 2, generator=generator) * 32, torch.tensor([0, 1, 2, 0, 1, 2])
    reference = crops_by_matrices(images, centers, which, (8, 16, 32), 12, torch.float32)
    for dtype, step in ((torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)):
        half = crops_by_matrices(images, centers, which, (8, 16, 32), 12, dtype)
        assert half.dtype == dtype and not half.isnan().any()
        torch.testing.assert_close(half.float(), reference, rtol=2 * step, atol=2 * step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_resize_by_matrices_equals_the_anti_aliased_resize(dtype: torch.dtype) -> None:
    """The glance's resize off the CPU (Wᵀ X W, PyTorch's own weights) gives `F.interpolate`'s anti-aliased
    resize: to float32 rounding, or within two rounding steps of the half precision it computes in; uint8
    scaled to [0, 1] as `resize_images` does; weights for another size refused."""
    from frugalvit.dvt.focus import resize_by_matrices, resize_weights

    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    expected = resize_images(images.float() / 255, (16, 16))
    step = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for given in (images, images.float() / 255):
        got = resize_by_matrices(given, resize_weights(40, 16), dtype)
        assert got.dtype == dtype and got.shape == (4, 3, 16, 16)
        torch.testing.assert_close(got.float(), expected, rtol=2 * step, atol=2 * step)
    with pytest.raises(ValueError, match="resize weights for 40 px images, got 32 px"):
        resize_by_matrices(images[..., :32, :32], resize_weights(40, 16), dtype)


def test_the_matrix_paths_give_the_same_views_and_compile_whole() -> None:
    """The cascade's path off the CPU (glance resize and crops as matrix products; forced here with
    `by_matrices`): the same stage inputs as the CPU path to float rounding; early exit equals
    `forward_every_stage` on it; and the whole every-stage form compiles as one graph, so nothing is read on
    the host (what capturing it as a CUDA graph needs)."""
    cascade = _cascade(later=False)
    images = torch.randint(0, 256, (9, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    as_float = images.float() / 255
    with torch.no_grad():
        on_cpu_path = cascade.glance_tokens(as_float)
        centers, sides = cascade.locate(on_cpu_path)
        crops = crop_boxes(as_float, centers, sides * 1.5, 24, (8, 16, 40))
        cascade.by_matrices = True
        torch.testing.assert_close(cascade.glance_tokens(images), on_cpu_path, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cascade.focus_input(images, centers, sides), crops, atol=1e-5, rtol=1e-5)
        confidence = [float(l.softmax(-1).amax(-1).median()) for l in cascade.forward_all(images)]
        thresholds = (confidence[0],)
        early, every = cascade(images, thresholds), cascade.forward_every_stage(images, thresholds)
        assert every.exit_stage.tolist() == early.exit_stage.tolist() and len(set(early.exit_stage.tolist())) == 2
        torch.testing.assert_close(every.logits, early.logits, atol=1e-5, rtol=1e-5)
        within = cascade.forward_within_capacity(images, (1.0,), thresholds)  # the boxes regrouped as a carry
        assert within.exit_stage.tolist() == early.exit_stage.tolist()
        torch.testing.assert_close(within.logits, early.logits, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(lambda batch: cascade.forward_every_stage(batch, thresholds), fullgraph=True)
        whole = compiled(images)
    assert whole.exit_stage.tolist() == early.exit_stage.tolist()
    torch.testing.assert_close(whole.logits, early.logits, atol=1e-5, rtol=1e-5)


def test_crops_by_matrices_compile_as_one_graph() -> None:
    """No host sync in the crop path used off the CPU: it compiles whole (fullgraph) and gives the same crops."""
    from frugalvit.dvt.focus import crop_weight_table, crops_by_matrices

    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=generator)
    centers = torch.rand(5, 2, generator=generator) * 32
    which, table = torch.tensor([0, 1, 2, 0, 1]), crop_weight_table((8, 16, 32), 32, 12)

    def crops(images: torch.Tensor, centers: torch.Tensor, which: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return crops_by_matrices(images, centers, which, (8, 16, 32), 12, torch.float32, table)

    compiled = torch.compile(crops, fullgraph=True)
    torch.testing.assert_close(compiled(images, centers, which, table), crops(images, centers, which, table))
    with CostCounter() as cost:  # a crop's resize adds no model MACs, as on the CPU (F.interpolate)
        crops(images, centers, which, table)
    assert cost.macs == 0


def _tiny_config() -> "GlanceFocusConfig":
    from frugalvit.dvt.glance_training import GlanceFocusConfig

    return GlanceFocusConfig(image_size=40, look_size=16, patch_size=8, num_classes=5, embed_dim=32, depth=1,
                             num_heads=2, conv_stem=(), crop_sides=(8, 16, 40), margin=1.5, locator_hidden=16)


def test_glance_focus_config_round_trips_and_refuses_bad_settings() -> None:
    from frugalvit.dvt.glance_training import GlanceFocusConfig

    config = _tiny_config()
    assert GlanceFocusConfig.from_dict(config.to_dict()) == config and config.grid == 2
    cascade = config.build()
    assert cascade.sizes == (16, 16) and cascade.crop_sides == (8, 16, 40) and cascade.input_shape == (3, 40, 40)
    for bad, message in (({"look_size": 20}, "does not divide the look size"), ({"look_size": 48}, "must lie in"),
                         ({"crop_sides": (8, 64)}, "crop sides must lie"), ({"num_heads": 3}, "divisible"),
                         ({"margin": 0.0}, "margin must be a finite number > 0"), ({"depth": 0}, "depth"),
                         ({"locator_hidden": 0}, "locator_hidden"), ({"conv_stem": (0,)}, "conv_stem"),
                         ({"num_heads": 0}, "num_heads must be at least 1")):
        with pytest.raises(ValueError, match=message):
            GlanceFocusConfig(**{**config.to_dict(), **bad})
    with pytest.raises(ValueError, match="unknown glance-and-focus config field"):
        GlanceFocusConfig.from_dict({**config.to_dict(), "zoom": 2})


def test_focus_training_crops_are_the_focus_input_at_the_located_boxes_without_jitter() -> None:
    from frugalvit.dvt.glance_training import focus_training_crops

    torch.manual_seed(0)
    cascade = _tiny_config().build()
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    crops = focus_training_crops(cascade, images, (0.0, 0.0), seed=0, batch_size=2)
    with torch.no_grad():
        located = cascade.locate(cascade.glance_tokens(images))
        torch.testing.assert_close(crops, cascade.focus_input(images, *located))
    jittered = focus_training_crops(cascade, images, (0.3, 1.0), seed=0, batch_size=2)  # sides change choice
    assert jittered.shape == (5, 3, 16, 16) and not torch.equal(jittered, crops)
    torch.testing.assert_close(focus_training_crops(cascade, images, (0.3, 1.0), seed=0, batch_size=2), jittered)


def test_glance_focus_training_learns_the_boxes_phase_by_phase_and_resumes(tmp_path) -> None:
    """Phase 1 trains the glance and its locator on the recorded boxes (the box error falls), phase 2 only the
    focus; each phase leaves its weights in its folder, and a second call loads them instead of training."""
    from frugalvit.data import Split
    from frugalvit.dvt.glance_training import train_glance_focus
    from frugalvit.training import TrainConfig

    generator = torch.Generator().manual_seed(0)
    count = 48
    sides = torch.randint(8, 24, (count,), generator=generator)
    tops = (torch.rand(count, generator=generator) * (40 - sides)).long()
    lefts = (torch.rand(count, generator=generator) * (40 - sides)).long()
    images = torch.zeros(count, 3, 40, 40, dtype=torch.uint8)
    for index in range(count):  # a bright square where the box is
        images[index, :, tops[index]:tops[index] + sides[index], lefts[index]:lefts[index] + sides[index]] = 255
    labels = sides % 5
    boxes = torch.stack([tops, lefts, sides], dim=1)
    torch.manual_seed(0)
    cascade = _tiny_config().build()
    untrained_focus = {key: value.clone() for key, value in cascade.focus.state_dict().items()}

    def box_error() -> float:
        with torch.no_grad():
            predicted = cascade.locator(cascade.glance_tokens(images))
        from frugalvit.dvt import BoxLocator
        return BoxLocator.loss(predicted, BoxLocator.target(tops, lefts, sides, 40)).item()

    before = box_error()
    phases: list[str] = []
    config = TrainConfig(epochs=4, batch_size=16, lr=3e-3, warmup_steps=1)
    train_glance_focus(cascade, Split(images, labels), boxes, config, tmp_path, progress=False,
                       on_phase=phases.append)
    assert phases == ["glance", "focus"] and box_error() < 0.7 * before
    assert (tmp_path / "glance" / "model.pt").is_file() and (tmp_path / "focus" / "model.pt").is_file()
    assert any(not torch.equal(untrained_focus[key], value) for key, value in cascade.focus.state_dict().items())
    trained = {key: value.clone() for key, value in cascade.state_dict().items()}
    torch.manual_seed(1)
    again = _tiny_config().build()
    train_glance_focus(again, Split(images, labels), boxes, config, tmp_path, progress=False,
                       on_phase=phases.append)
    assert phases == ["glance", "focus"]  # nothing trained again: both phases loaded
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one box"):
        train_glance_focus(again, Split(images, labels), boxes[:3], config)
    # a finished phase is checked against these settings and data, not handed back whatever it was trained on
    with pytest.raises(ValueError, match="other depends_on"):
        train_glance_focus(again, Split(images, (labels + 1) % 5), boxes, config, tmp_path, progress=False)
    with pytest.raises(ValueError, match="other config"):
        train_glance_focus(again, Split(images, labels), boxes, TrainConfig(epochs=5, batch_size=16), tmp_path,
                           progress=False)
    with pytest.raises(ValueError, match="inside the 40 px image"):
        train_glance_focus(again, Split(images, labels), boxes + torch.tensor([30, 0, 0]), config)
    with pytest.raises(ValueError, match=r"the cascade takes images \(3, 40, 40\)"):
        train_glance_focus(again, Split(images[..., :32, :32], labels), boxes.clamp(max=8), config)
