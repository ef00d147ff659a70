"""DVT cascades: early exit, reuse, exactness anchors, threshold search, MAC accounting, bad input, CLI."""

from __future__ import annotations

import copy
import itertools
import math
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Attention, VisionTransformer

from frugalvit.cost import CostCounter
from frugalvit.dvt import (DVTConfig, ResolutionCascade, attention_with_bias, cascade_loss, dvt_stage, resize_images,
                           evaluate_thresholds, genetic_search, geometric_search, resize_attention_rows,
                           resize_token_grid, search_thresholds, stage_forward, vit_at_resolution)
from frugalvit.dvt.exit import EarlyExitCascade
from frugalvit.dvt.thresholds import exit_stages

TINY = dict(image_size=28, patch_sizes=(14, 7, 4), in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
            context_dim=8)


def _randomise_reuse(cascade: torch.nn.Module, seed: int = 0) -> None:
    """Reuse modules start as no-ops (zero last layer); give them weights so that they matter."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in cascade.named_parameters():
        if "reuse" in name:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _cascade(feature: bool = True, relation: bool = True, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cascade = DVTConfig(**{**TINY, **overrides}, feature_reuse=feature, relation_reuse=relation).build().eval()
    _randomise_reuse(cascade, seed)
    return cascade


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# -- building blocks ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_attention_matches_explicit_path(with_bias: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 9, 32)
    bias = torch.randn(3, 4, 9, 9) if with_bias else None
    fused, none = attention_with_bias(attn, x, bias)
    explicit, logits = attention_with_bias(attn, x, bias, return_logits=True)
    assert none is None and logits is not None and logits.shape == (3, 4, 9, 9)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    if not with_bias:
        torch.testing.assert_close(fused, attn(x), atol=1e-6, rtol=1e-6)
        attn.fused_attn = False
        torch.testing.assert_close(attention_with_bias(attn, x)[0], attn(x), atol=1e-6, rtol=1e-6)


def test_stage_without_reuse_is_a_plain_timm_vit() -> None:
    torch.manual_seed(0)
    stage = dvt_stage(28, 7, 1, 10, embed_dim=32, depth=2, num_heads=2).eval()
    plain = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                              num_heads=2).eval()
    plain.load_state_dict(stage.state_dict())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(stage_forward(stage, x).logits, plain(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stage_forward(stage, x, return_attention=True).logits, plain(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stage(x), plain(x), atol=1e-6, rtol=1e-6)


def test_cascade_without_reuse_stages_are_plain_timm_vits(images: torch.Tensor) -> None:
    cascade = _cascade(feature=False, relation=False)
    stage_logits = cascade.forward_all(images)
    for stage, logits in zip(cascade.stages, stage_logits):
        torch.testing.assert_close(logits, stage(images), atol=1e-5, rtol=1e-5)


def test_resize_token_grid_identity_and_shape() -> None:
    tokens = torch.randn(2, 16, 5)
    assert resize_token_grid(tokens, (4, 4), (4, 4)) is tokens
    assert resize_token_grid(tokens, (4, 4), (7, 7)).shape == (2, 49, 5)
    constant = torch.ones(1, 4, 3)
    torch.testing.assert_close(resize_token_grid(constant, (2, 2), (7, 7)), torch.ones(1, 49, 3))


def test_attention_resize_is_row_wise() -> None:
    """Each query row is resized on the key grid, and the query axis on the query grid; prefix kept."""
    source, target, prefix = (2, 2), (3, 3), 1
    n = prefix + 4
    maps = torch.randn(2, 3, n, n)
    out = resize_attention_rows(maps, source, target, prefix)
    assert out.shape == (2, 3, 10, 10)
    torch.testing.assert_close(out[..., :prefix, :prefix], maps[..., :prefix, :prefix])
    # the class-token row's grid part is that row resized as an image
    row = maps[..., 0, prefix:].reshape(2 * 3, 1, 2, 2)
    expected = torch.nn.functional.interpolate(row, size=target, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., 0, prefix:], expected.reshape(2, 3, 9))
    # a map whose rows depend only on the query position stays so (no mixing of the two grids)
    query_only = torch.arange(4.0).repeat_interleave(4).reshape(1, 1, 4, 4)
    resized = resize_attention_rows(query_only, source, target, 0)
    assert torch.allclose(resized, resized[..., :1].expand_as(resized))
    with pytest.raises(ValueError, match="expected maps over"):
        resize_attention_rows(torch.randn(1, 1, 6, 6), source, target, prefix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resizes_as_matmuls_equal_interpolate(dtype: torch.dtype) -> None:
    """The matrix forms equal the plain reference: F.interpolate on the token grid, then on the query grid."""
    source, target, prefix = (3, 3), (5, 5), 1
    tokens = torch.randn(2, 9, 6)
    grid = tokens.reshape(2, 3, 3, 6).permute(0, 3, 1, 2)
    reference = torch.nn.functional.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    reference = reference.permute(0, 2, 3, 1).reshape(2, 25, 6)
    torch.testing.assert_close(resize_token_grid(tokens, source, target), reference, atol=1e-6, rtol=1e-6)
    maps = torch.randn(2, 4, 10, 10)

    def plain_last_axis(x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.interpolate(x.reshape(-1, 1, *source), size=target, mode="bilinear",
                                              align_corners=False)
        return out.reshape(*x.shape[:-1], 25)

    columns = torch.cat([maps[..., :prefix], plain_last_axis(maps[..., prefix:])], -1).transpose(-1, -2)
    expected = torch.cat([columns[..., :prefix], plain_last_axis(columns[..., prefix:])], -1).transpose(-1, -2)
    out = resize_attention_rows(maps.to(dtype), source, target, prefix)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("size", [(48, 48), (80, 80), (168, 168)])
def test_uint8_images_resize_like_floats(size: tuple[int, int]) -> None:
    """uint8 images come back as [0, 1] floats, within about a grey level of the float resize (the reference)."""
    images = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.functional.interpolate(images.float() / 255.0, size=size, mode="bilinear",
                                                align_corners=False, antialias=True)
    out = resize_images(images, size)
    assert out.dtype == torch.float32 and out.shape == reference.shape and out.is_contiguous()
    assert (out - reference).abs().max() <= 1.5 / 255.0  # fixed-point weights, then rounding: measured <= 1.01
    assert resize_images(images, size, dtype=torch.bfloat16).dtype == torch.bfloat16
    same = resize_images(images, (112, 112))
    torch.testing.assert_close(same, images.float() / 255.0)


def test_cascade_takes_uint8_images() -> None:
    """A cascade fed uint8 images: real early exit equals its own per-stage logits, and is close to float input."""
    torch.manual_seed(0)
    cascade = DVTConfig(image_size=32, image_sizes=(16, 24, 32), patch_sizes=(8, 8, 8), in_chans=3, embed_dim=32,
                        depth=1, num_heads=2, context_dim=8).build().eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stage_logits = cascade.forward_all(images)
        as_floats = cascade.forward_all(images.float() / 255.0)
        confidence = torch.stack([l.softmax(-1).amax(-1) for l in stage_logits]).numpy()
        thresholds = [float(np.median(confidence[0])), float(np.median(confidence[1]))]
        out = cascade(images, thresholds=thresholds)
    for ours, theirs in zip(stage_logits, as_floats):
        torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.05)
    expected = exit_stages(confidence, thresholds)
    assert out.exit_stage.tolist() == expected.tolist()
    for index, stage in enumerate(expected.tolist()):
        torch.testing.assert_close(out.logits[index], stage_logits[stage][index], atol=1e-5, rtol=1e-5)


# -- early exit --------------------------------------------------------------------------------

@pytest.mark.parametrize("feature,relation", [(False, False), (True, True)])
def test_early_exit_follows_confidence(images: torch.Tensor, feature: bool, relation: bool) -> None:
    cascade = _cascade(feature, relation)
    with torch.no_grad():
        stage_logits = cascade.forward_all(images)
        confidence = torch.stack([l.softmax(-1).amax(-1) for l in stage_logits]).numpy()
        thresholds = [float(np.median(confidence[0])), float(np.median(confidence[1]))]
        out = cascade(images, thresholds=thresholds)
    expected = exit_stages(confidence, thresholds)
    assert out.exit_stage.tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 1
    for index, stage in enumerate(expected.tolist()):
        torch.testing.assert_close(out.logits[index], stage_logits[stage][index], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feature,relation", [(False, False), (True, True)])
def test_every_stage_form_gives_the_early_exit_outputs(images: torch.Tensor, feature: bool, relation: bool) -> None:
    """`forward_every_stage` (no early exit, no host round trips) returns what early exit returns, at mixed,
    all-first and all-last exits; its cost is every stage for every sample."""
    cascade = _cascade(feature, relation)
    with torch.no_grad():
        confidence = torch.stack([l.softmax(-1).amax(-1) for l in cascade.forward_all(images)]).numpy()
        mixed = [float(np.median(confidence[0])), float(np.median(confidence[1]))]
        for thresholds in (mixed, [0.0, 0.0], [1.0, 1.0]):
            early, every = cascade(images, thresholds=thresholds), cascade.forward_every_stage(images, thresholds)
            assert every.exit_stage.tolist() == early.exit_stage.tolist()
            torch.testing.assert_close(every.logits, early.logits, atol=1e-5, rtol=1e-5)
        cascade.set_thresholds(mixed)
        assert cascade.forward_every_stage(images).exit_stage.tolist() == cascade(images).exit_stage.tolist()
        with CostCounter() as cost:
            cascade.forward_every_stage(images[:1])
    assert cost.macs == cascade.stage_macs()[-1]


@pytest.mark.parametrize("feature,relation", [(False, False), (True, True)])
def test_within_capacity_equals_early_exit_where_the_undecided_fit(images: torch.Tensor, feature: bool,
                                                                   relation: bool) -> None:
    """`forward_within_capacity` (static shapes, no host read) gives early exit's outputs whenever each stage's
    undecided samples fit its capacity (reuse carries regrouped too), and costs its capacities exactly."""
    cascade = _cascade(feature, relation)
    batch = images.shape[0]
    with torch.no_grad():
        confidence = torch.stack([l.softmax(-1).amax(-1) for l in cascade.forward_all(images)]).numpy()
        thresholds = [float(np.median(confidence[0])), float(np.median(confidence[1]))]
        early = cascade(images, thresholds=thresholds)
        reached = [int((early.exit_stage >= stage).sum()) for stage in (1, 2)]
        for capacities in ((1.0, 1.0), (reached[0] / batch, reached[1] / batch), (0.75, 0.5)):
            if any(need > math.ceil(share * batch) for need, share in zip(reached, capacities)):
                continue  # not a case where they fit
            within = cascade.forward_within_capacity(images, capacities, thresholds)
            assert within.exit_stage.tolist() == early.exit_stage.tolist()
            torch.testing.assert_close(within.logits, early.logits, atol=1e-5, rtol=1e-5)
        with CostCounter() as cost:
            cascade.forward_within_capacity(images, (0.5, 0.25), thresholds)
    costs = np.diff([0, *cascade.stage_macs()])
    assert cost.macs == batch * costs[0] + math.ceil(0.5 * batch) * costs[1] + math.ceil(0.25 * batch) * costs[2]


def test_capacities_follow_the_share_reaching_each_stage() -> None:
    from frugalvit.dvt import ExitResult

    result = ExitResult((0.9, 0.8), 0.5, 1e6, (0.5, 0.3, 0.2))
    assert result.capacities() == pytest.approx((0.55, 0.25)) and result.capacities(0.0) == pytest.approx((0.5, 0.2))
    assert ExitResult((0.0,), 0.5, 1e6, (0.0, 1.0)).capacities() == (1.0,)
    with pytest.raises(ValueError, match="margin"):
        result.capacities(-0.1)


def test_within_capacity_stops_the_most_confident_overflow_and_compiles_whole(images: torch.Tensor) -> None:
    """Where more samples are undecided than a stage holds, the least confident run it and the rest stop with
    their last stage's answer; with thresholds given the whole forward compiles as one graph."""
    cascade = _cascade(False, False)
    with torch.no_grad():
        stages = cascade.forward_all(images)
        confidence = stages[0].softmax(-1).amax(-1)
        thresholds = (1.0, 1.0)  # nobody exits early: every sample wants every stage
        within = cascade.forward_within_capacity(images, (0.5, 0.25), thresholds)
        compiled = torch.compile(lambda batch: cascade.forward_within_capacity(batch, (0.5, 0.25), thresholds),
                                 fullgraph=True)(images)
    second = set(confidence.argsort()[:6].tolist())  # the 6 least confident after the glance
    assert {i for i, stage in enumerate(within.exit_stage.tolist()) if stage >= 1} == second
    assert int((within.exit_stage == 2).sum()) == 3
    for index, stage in enumerate(within.exit_stage.tolist()):
        torch.testing.assert_close(within.logits[index], stages[stage][index], atol=1e-5, rtol=1e-5)
    assert compiled.exit_stage.tolist() == within.exit_stage.tolist()
    torch.testing.assert_close(compiled.logits, within.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected 2 capacities in"):
        cascade.forward_within_capacity(images, (0.5,), thresholds)
    with pytest.raises(ValueError, match="expected 2 capacities in"):
        cascade.forward_within_capacity(images, (0.5, 0.0), thresholds)


def test_exit_decisions_compare_in_float32_as_calibrated() -> None:
    """A threshold is compared as its float32 value (what calibration stored), without a tensor sent to the
    device: a confidence of exactly 0.5 exits at 0.5 and at 0.5 + 1e-12 (0.5 in float32), not one step above."""
    from frugalvit.dvt import EarlyExitCascade

    logits = torch.zeros(1, 2)  # confidence 0.5 exactly
    assert EarlyExitCascade.exits(logits, 0.5).item() and EarlyExitCascade.exits(logits, 0.5 + 1e-12).item()
    assert not EarlyExitCascade.exits(logits, float(np.nextafter(np.float32(0.5), np.float32(1)))).item()
    assert not EarlyExitCascade.exits(logits, 1.0).item()


def test_every_stage_form_has_no_host_sync(images: torch.Tensor) -> None:
    """With thresholds given, `forward_every_stage` compiles as one graph (nothing read on the host), where
    early exit reads every decision; the compiled form gives early exit's answers."""
    cascade = _cascade(False, False)
    compiled = torch.compile(lambda batch: cascade.forward_every_stage(batch, (0.3, 0.5)), fullgraph=True)
    with torch.no_grad():
        out, early = compiled(images), cascade(images, thresholds=(0.3, 0.5))
    assert out.exit_stage.tolist() == early.exit_stage.tolist()
    torch.testing.assert_close(out.logits, early.logits, atol=1e-5, rtol=1e-5)


def test_thresholds_at_one_give_the_last_stage_for_every_sample(images: torch.Tensor) -> None:
    cascade = _cascade()
    with torch.no_grad():
        last = cascade.forward_all(images)[-1]
        out = cascade(images, thresholds=[1.0, 1.0])
    assert out.exit_stage.tolist() == [2] * len(images)
    torch.testing.assert_close(out.logits, last, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        first = cascade(images, thresholds=[0.0, 0.0])
    assert first.exit_stage.tolist() == [0] * len(images)


def test_regrouping_preserves_order(images: torch.Tensor) -> None:
    cascade = _cascade()
    with torch.no_grad():
        confidence = cascade.forward_all(images)[0].softmax(-1).amax(-1)
        thresholds = [float(confidence.median()), 0.0]
        batched = cascade(images, thresholds=thresholds)
        single = [cascade(images[i:i + 1], thresholds=thresholds) for i in range(len(images))]
    assert batched.exit_stage.tolist() == [s.exit_stage.item() for s in single]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]), atol=1e-5, rtol=1e-5)


def test_reuse_changes_output_only_when_enabled(images: torch.Tensor) -> None:
    cascade = _cascade()
    with torch.no_grad():
        before = cascade.forward_all(images)
        perturbed = copy.deepcopy(cascade)
        _randomise_reuse(perturbed, seed=7)
        after = perturbed.forward_all(images)
        torch.testing.assert_close(after[0], before[0])  # stage 1 has no upstream
        assert not torch.allclose(after[1], before[1]) and not torch.allclose(after[2], before[2])
        for module in (cascade, perturbed):
            module.use_feature_reuse = module.use_relation_reuse = False
        off, off_perturbed = cascade.forward_all(images), perturbed.forward_all(images)
        for a, b in zip(off, off_perturbed):
            torch.testing.assert_close(a, b)
        assert not torch.allclose(off[2], before[2])
        # each reuse alone changes the downstream output
        for flag in ("use_feature_reuse", "use_relation_reuse"):
            setattr(cascade, flag, True)
            assert not torch.allclose(cascade.forward_all(images)[2], off[2])
            setattr(cascade, flag, False)


def test_zero_initialised_reuse_is_a_no_op(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    with_reuse = DVTConfig(**TINY).build().eval()
    torch.manual_seed(0)
    without = DVTConfig(**TINY, feature_reuse=False, relation_reuse=False).build().eval()
    without.stages[0].load_state_dict(with_reuse.stages[0].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(with_reuse.forward_all(images)[0], without.forward_all(images)[0])
        with_reuse.use_feature_reuse = with_reuse.use_relation_reuse = True
        a = with_reuse.forward_all(images)
        with_reuse.use_feature_reuse = with_reuse.use_relation_reuse = False
        b = with_reuse.forward_all(images)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_training_step_reduces_loss_and_reaches_reuse_modules() -> None:
    cascade = _cascade().train()
    torch.manual_seed(0)
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    optimizer = torch.optim.AdamW(cascade.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = cascade_loss(cascade, images, labels)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    grads = [p.grad for name, p in cascade.named_parameters() if "reuse" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# -- costs -------------------------------------------------------------------------------------

def _vit_macs(tokens: int, dim: int, depth: int, grid_tokens: int, patch_in: int, classes: int,
              context: int = 0, attention_bias_free: bool = True) -> int:
    per_block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim \
        + tokens * (dim + context) * 4 * dim + tokens * 4 * dim * dim
    return grid_tokens * patch_in * dim + depth * per_block + dim * classes


def test_stage_macs_match_analytic_counts() -> None:
    dim, depth, heads, ctx, classes = 32, 2, 2, 8, 10
    grids = [4, 16, 49]
    patches = [14 * 14, 7 * 7, 4 * 4]
    plain = [_vit_macs(g + 1, dim, depth, g, p, classes) for g, p in zip(grids, patches)]
    cascade = _cascade(feature=False, relation=False)
    assert cascade.stage_macs() == tuple(itertools.accumulate(plain))

    feature = [_vit_macs(g + 1, dim, depth, g, p, classes, context=ctx if i else 0)
               for i, (g, p) in enumerate(zip(grids, patches))]
    sides = [int(g ** 0.5) for g in grids]
    # a separable grid resize of one plane: along the width (h*w*w'), then the height (h'*h*w')
    plane = [sides[i] * sides[i] * sides[i + 1] + sides[i + 1] * sides[i] * sides[i + 1] for i in range(2)]
    feature_mlps = [g * (dim * dim + dim * ctx) for g in grids[:-1]]  # LN + Mlp(D -> D -> D') on upstream patches
    feature_mlps = [mlp + ctx * resize for mlp, resize in zip(feature_mlps, plane)]  # + the context's resize
    cascade = _cascade(feature=True, relation=False)
    expected = [feature[0], feature[0] + feature_mlps[0] + feature[1],
                feature[0] + feature_mlps[0] + feature[1] + feature_mlps[1] + feature[2]]
    assert cascade.stage_macs() == tuple(expected)

    maps = depth * heads  # 1x1 convs L*H -> L*H -> L*H at the upstream token count
    convs = [(g + 1) ** 2 * 2 * maps * maps for g in grids[:-1]]
    # + the row-wise resize: every upstream row's key grid, then every downstream column's query grid
    convs = [conv + maps * (grids[i] + 1 + grids[i + 1] + 1) * plane[i] for i, conv in enumerate(convs)]
    cascade = _cascade(feature=False, relation=True)
    expected = [plain[0], plain[0] + convs[0] + plain[1], plain[0] + convs[0] + plain[1] + convs[1] + plain[2]]
    assert cascade.stage_macs() == tuple(expected)


def test_counted_macs_of_a_real_run_match_the_exit_costs(images: torch.Tensor) -> None:
    cascade = _cascade()
    with torch.no_grad():
        confidence = cascade.forward_all(images)[0].softmax(-1).amax(-1)
        thresholds = [float(confidence.median()), 0.0]
        with CostCounter() as cost:
            out = cascade(images, thresholds=thresholds)
    costs = cascade.stage_macs()
    assert cost.macs == sum(costs[s] for s in out.exit_stage.tolist())
    single = cascade.stages[-1]
    with CostCounter() as alone:
        single(images[:1])
    assert costs[-1] > alone.macs  # a full pass costs more than the last stage alone


# -- thresholds --------------------------------------------------------------------------------

def _synthetic(n: int, seed: int, stages: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0, 1, n)
    skill = np.linspace(0.3, 0.9, stages)[:, None]
    confidence = np.clip(1 - difficulty[None] * rng.uniform(0.5, 1.2, (stages, n)) * (1.2 - skill), 0.1, 1.0)
    correct = rng.uniform(0, 1, (stages, n)) < (confidence * 0.5 + skill * 0.5)
    return confidence.astype(np.float32), correct


def _brute_force(confidence: np.ndarray, correct: np.ndarray, costs, budget: float) -> float:
    candidates = [sorted(set(np.minimum(row, np.float32(0.99999994)).tolist()) | {1.0}) for row in confidence[:-1]]
    best = 0.0
    for thresholds in itertools.product(*candidates):
        result = evaluate_thresholds(confidence, correct, costs, thresholds)
        if result.mean_macs <= budget:
            best = max(best, result.accuracy)
    return best


@pytest.mark.parametrize("stages", [2, 3])
def test_search_is_exact_on_small_problems(stages: int) -> None:
    confidence, correct = _synthetic(30, seed=stages, stages=stages)
    costs = [1.0, 3.0, 8.0][:stages]
    for budget in (1.0, 1.7, 2.5, costs[-1]):
        found = search_thresholds(confidence, correct, costs, budget)
        assert found.mean_macs <= budget + 1e-9
        assert found.accuracy == pytest.approx(_brute_force(confidence, correct, costs, budget))


def test_search_meets_budget_and_beats_baselines_on_held_out_split() -> None:
    confidence, correct = _synthetic(2000, seed=0)
    costs = [1e6, 4e6, 12e6]
    for budget in (2e6, 4e6, 7e6):
        exact = search_thresholds(confidence, correct, costs, budget)
        assert exact.mean_macs <= budget
        assert exact.accuracy >= geometric_search(confidence, correct, costs, budget).accuracy
        assert exact.accuracy >= genetic_search(confidence, correct, costs, budget, generations=10).accuracy
    four = np.concatenate([confidence, confidence[-1:]]), np.concatenate([correct, correct[-1:]])
    found = search_thresholds(*four, [1e6, 4e6, 12e6, 20e6], 6e6)
    assert found.mean_macs <= 6e6 and len(found.thresholds) == 3
    for search in (search_thresholds, geometric_search, genetic_search):  # NaN is no budget (not "exit first")
        with pytest.raises(ValueError, match="budget is NaN"):
            search(confidence, correct, costs, float("nan"))


def test_calibrated_budget_is_met_by_the_real_forward(images: torch.Tensor) -> None:
    cascade = _cascade()
    labels = torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(0))
    calibration = cascade.calibrate(images, labels, batch_size=5)
    costs = calibration.stage_macs
    budget = (costs[0] + costs[1]) / 2
    result = cascade.set_budget(budget)
    assert result.mean_macs <= budget
    assert cascade.thresholds.tolist() == pytest.approx(list(result.thresholds))
    with torch.no_grad(), CostCounter() as cost:
        out = cascade(images)
    assert cost.macs / len(images) == pytest.approx(result.mean_macs)
    assert cost.macs / len(images) <= budget
    predicted = exit_stages(calibration.confidence, result.thresholds)
    assert out.exit_stage.tolist() == predicted.tolist()


# -- training-free resolution cascade ----------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"no_embed_class": True, "init_values": 1e-3}, {"reg_tokens": 2}])
def test_resolution_cascade_at_full_resolution_equals_timm(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=2,
                              num_heads=2, **kwargs).eval()
    cascade = ResolutionCascade(model, [16, 24, 32]).eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        out = cascade(x, thresholds=[1.0, 1.0])
        torch.testing.assert_close(out.logits, model(x), atol=1e-5, rtol=1e-5)
        # a lower resolution equals timm's own model at that input size (pos embeddings resampled by timm)
        resized = copy.deepcopy(model)
        resized.set_input_size(img_size=24)
        small = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", antialias=True)
        torch.testing.assert_close(vit_at_resolution(model, small), resized(small), atol=1e-5, rtol=1e-5)
        costs = cascade.stage_macs()
    assert costs[0] < costs[1] - costs[0] < costs[2] - costs[1]


def test_resolution_cascade_rejects_bad_resolutions() -> None:
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="increasing"):
        ResolutionCascade(model, [32, 16])
    with pytest.raises(ValueError, match="divisible"):
        ResolutionCascade(model, [12, 32])


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(images: torch.Tensor) -> None:
    cascade = _cascade()
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 28, 28\)"):
        cascade(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="needs 2 thresholds"):
        cascade(images, thresholds=[0.5])
    for wrong in ("11", 0.9):  # a string is not two thresholds, a number not a sequence
        with pytest.raises(ValueError, match="sequence of 2 numbers"):
            cascade(images, thresholds=wrong)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cascade.set_thresholds([0.5, 1.5])
    with pytest.raises(ValueError, match="call cascade.calibrate"):
        cascade.set_budget(1e9)
    cascade.calibrate(images, torch.zeros(len(images), dtype=torch.long))
    with pytest.raises(ValueError, match="below the first stage's cost"):
        cascade.set_budget(10)
    with pytest.raises(ValueError, match="budget is NaN"):
        cascade.set_budget(float("nan"))
    with pytest.raises(ValueError, match="does not divide"):
        DVTConfig(image_size=28, patch_sizes=(14, 5))
    with pytest.raises(ValueError, match="at least 2 stages"):
        DVTConfig(patch_sizes=(7,))
    for wrong in ({"image_size": 0}, {"depth": 0}, {"num_heads": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            DVTConfig(**wrong)


# -- command line ------------------------------------------------------------------------------

def test_cli_train_calibrate_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from frugalvit.cli.main import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", images=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 3, 60))
    run = tmp_path / "run"
    common = ["--data", str(tmp_path / "tiny.npz"), "--out", str(run), "--embed-dim", "16", "--depth", "1",
              "--heads", "2", "--context-dim", "4", "--epochs", "1", "--batch-size", "16", "--no-progress"]
    assert main(["dvt", "train", *common]) == 0
    assert {"config.json", "checkpoint.pt", "model.pt"} <= {p.name for p in run.iterdir()}
    assert main(["dvt", "train", *common]) == 0  # resumes: already complete
    assert "resuming" in capsys.readouterr().out
    assert main(["dvt", "train", *common[:-1], "--epochs", "2"]) == 2  # different settings, same dir
    assert main(["dvt", "calibrate", str(run), "--budget", "1", "--no-progress"]) == 2
    assert "below the first stage's cost" in capsys.readouterr().err
    assert main(["dvt", "calibrate", str(run), "--budget", "10M", "--no-progress"]) == 0
    saved = json.loads((run / "thresholds.json").read_text())
    assert len(saved["thresholds"]) == 2 and saved["val_mean_macs"] <= 10e6
    capsys.readouterr()
    assert main(["dvt", "eval", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "mean MACs" in out and "stage 3" in out
    assert main(["dvt", "eval", str(run), "--thresholds", "0.5", "--no-progress"]) == 2
    assert main(["dvt", "calibrate", str(tmp_path / "missing"), "--budget", "1M"]) == 2


# -- convolutional stem --------------------------------------------------------------------------

def test_conv_stem_stage_keeps_the_token_grid_and_counts_its_macs() -> None:
    from frugalvit.dvt import ConvStemEmbed

    config = DVTConfig(image_size=32, image_sizes=(16, 32), patch_sizes=(8, 8), in_chans=3, num_classes=4,
                       embed_dim=16, depth=1, num_heads=2, context_dim=4, conv_stem=(4, 8))
    torch.manual_seed(0)
    cascade = config.build().eval()
    assert all(isinstance(stage.patch_embed, ConvStemEmbed) for stage in cascade.stages)
    assert cascade.input_shape == (3, 32, 32) and config.grids == (2, 4)
    assert DVTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = cascade(x, thresholds=[1.0])
        torch.testing.assert_close(out.logits, cascade.forward_all(x)[1])
        plain = DVTConfig(**{**config.to_dict(), "conv_stem": []}).build()
        # the stem's convolutions are counted: stage 1 of 16 px through (4, 8) channels then a 2x2 projection
        stem = (8 * 8 * 4 * 3 * 9) + (4 * 4 * 8 * 4 * 9) + (2 * 2 * 16 * 8 * 4) - (2 * 2 * 16 * 3 * 64)
        assert cascade.stage_macs()[0] - plain.stage_macs()[0] == stem
    with pytest.raises(ValueError, match="divisible by 4"):
        DVTConfig(image_size=28, patch_sizes=(14, 7), in_chans=1, conv_stem=(4, 8)).build()


def test_carry_selection_takes_a_mask_or_row_indices() -> None:
    """The early-exit loop regroups a stage's carry (nested tensors) by row indices (index_select, whole rows);
    a boolean mask gives the same rows."""
    from frugalvit.dvt.exit import select

    carry = (torch.arange(12).view(4, 3), {"boxes": torch.arange(4.0)}, None)
    keep = torch.tensor([True, False, True, True])
    by_mask, by_rows = select(carry, keep), select(carry, keep.nonzero().squeeze(1))
    for picked in (by_mask, by_rows):
        assert torch.equal(picked[0], torch.tensor([[0, 1, 2], [6, 7, 8], [9, 10, 11]]))
        assert torch.equal(picked[1]["boxes"], torch.tensor([0.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="cannot regroup a carry of type int"):
        select(3, keep)


class _ToyExit(EarlyExitCascade):
    """Stage k's logits are images[:, 0, k]: any confidence can be written into the input."""

    def __init__(self) -> None:
        super().__init__(2, (1, 2, 3))
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def run_stage(self, index: int, images: torch.Tensor, carry, hand_on: bool):  # noqa: ANN001
        return images[:, 0, index] + 0 * self.weight, None


def test_edge_confidences_exit_alike_on_every_path() -> None:
    """NaN confidence never exits and is run first within capacity; an overflowed float16 logit is sure, not NaN;
    a threshold that rounds to 1.0 in float32 means never exit whether passed or stored; 0.07 x 100 is 7 rows."""
    nan = float("nan")
    toy = _ToyExit()
    x = torch.tensor([[[[nan, 0, 0], [5.0, 0, 0]]]] + [[[[9.0, 0, 0], [0, 9.0, 0]]]] * 3)
    assert toy(x, thresholds=[0.9]).exit_stage.tolist() == [1, 0, 0, 0]
    assert toy.forward_within_capacity(x, [0.25], [0.9]).exit_stage.tolist() == [1, 0, 0, 0]
    assert EarlyExitCascade.confidence(torch.tensor([[70000.0, 0, 0]]).half()).item() == 1.0
    sure = torch.tensor([[[[50.0, 0, 0], [0, 50.0, 0]]]])
    assert toy(sure, thresholds=[0.99999999]).exit_stage.tolist() == [1]
    toy.set_thresholds([0.99999999])
    assert toy(sure).exit_stage.tolist() == [1]
    conf = np.array([[0.9, 0.5, np.nan, 0.7], [0.2, 0.3, 0.4, 0.5]], np.float32)
    corr = np.array([[1, 1, 0, 1], [0, 0, 1, 0]], bool)
    found = search_thresholds(conf, corr, [1, 2], 2.0)
    assert found.accuracy == 1.0 and found.accuracy == evaluate_thresholds(conf, corr, [1, 2], found.thresholds).accuracy


def test_capacity_rows_are_exact_where_share_times_batch_is_whole() -> None:
    calls: list[int] = []

    class Counting(_ToyExit):
        def run_stage(self, index: int, images: torch.Tensor, carry, hand_on: bool):  # noqa: ANN001
            calls.append(images.shape[0])
            return super().run_stage(index, images, carry, hand_on)

    Counting().forward_within_capacity(torch.zeros(100, 1, 2, 3), [0.07], [0.9])
    assert calls == [100, 7]
