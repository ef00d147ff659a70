"""Many streams in one batch: one stream can start over (`reset(stream=i)`) without disturbing the others."""

from __future__ import annotations

import pytest
import timm
import torch

import frugalvit as fv
from frugalvit.eventful.model import EventfulViT
from test_eventful import make_model, patch_video
from test_eventful_capture import FxGraphFrame
from test_eventful_beit import make_beit
from test_eventful_eva import eva_video, make_eva
from test_eventful_sam import make_sam, sam_video


def run_streams(model: torch.nn.Module, frames: torch.Tensor, reset_at: int, stream: int,
                capture: bool = False, attention_rows: str = "all", token_selection: str = "per_gate"
                ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Batched outputs with a per-stream reset at `reset_at`, and each stream run alone (reset there too)."""
    policy = fv.TopR(5)
    options = {"attention_rows": attention_rows, "token_selection": token_selection}
    batched = fv.eventful(model, policy, capture=capture, **options)
    batched.sync_free = capture
    alone = [fv.eventful(model, policy, **options) for _ in range(frames.shape[1])]
    for single in alone:
        single.sync_free = capture
    outputs, singles = [], [[] for _ in alone]
    with torch.no_grad():
        for index, frame in enumerate(frames):
            if index == reset_at:
                batched.reset(stream=stream)
                alone[stream].reset()
            outputs.append(batched.forward_features(frame))
            for row, single in enumerate(alone):
                singles[row].append(single.forward_features(frame[row:row + 1]))
    return outputs, singles


@pytest.mark.parametrize("attention_rows,selection", [("all", "per_gate"), ("changed", "per_gate"),
                                                      ("all", "shared")])
@pytest.mark.parametrize("capture", [False, True], ids=["eager", "captured"])
def test_one_stream_starts_over_and_the_others_go_on(capture: bool, attention_rows: str, selection: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch row equals the same stream run alone, the reset stream included (TopR: rows independent;
    with shared selection the residual sums' row is rewritten too)."""
    monkeypatch.setattr(EventfulViT, "recorder", FxGraphFrame)
    model = make_model("deit3_small_patch16_224")
    frames = patch_video(8, batch=3, share=0.3)
    outputs, singles = run_streams(model, frames, reset_at=4, stream=1, capture=capture,
                                   attention_rows=attention_rows, token_selection=selection)
    for index, out in enumerate(outputs):
        for row in range(3):
            torch.testing.assert_close(out[row:row + 1], singles[row][index], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the reset frame of stream 1 is exactly the dense model's
        torch.testing.assert_close(outputs[4][1:2], model.forward_features(frames[4][1:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection", ["per_gate", "shared"])
@pytest.mark.parametrize("family", ["sam", "beit", "eva"])
def test_stream_reset_on_other_families(family: str, selection: str) -> None:
    """Windowed, relative-position, bias-table, rotary and neck state: the reset row is rewritten, the others
    untouched."""
    model, frames = {"sam": lambda: (make_sam(), sam_video(5, batch=2)),
                     "beit": lambda: (make_beit("per-layer-bias"), patch_video(5, batch=2)),
                     "eva": lambda: (make_eva("eva02-tiny"), eva_video(5, batch=2))}[family]()
    outputs, singles = run_streams(model, frames, reset_at=3, stream=0, token_selection=selection)
    for index, out in enumerate(outputs):
        for row in range(2):
            torch.testing.assert_close(out[row:row + 1], singles[row][index], rtol=1e-4, atol=1e-5)


def test_stream_reset_checks_the_row() -> None:
    ev = fv.eventful(make_model("vit_tiny_patch16_224"), fv.TopR(4))
    with torch.no_grad():
        ev(patch_video(1, batch=2)[0])
    with pytest.raises(ValueError, match="does not exist"):
        ev.reset(stream=2)
    with pytest.raises(TypeError, match="integer"):
        ev.refresh(stream=1.0)


def test_captured_frames_apply_scene_cuts_per_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """capture=True with cut_share: a stream that cuts is flagged on the device during a replayed frame and
    recomputed in full on the next one, the other streams going on; equal to that stream run alone."""
    monkeypatch.setattr(EventfulViT, "recorder", FxGraphFrame)
    model = make_model("deit3_small_patch16_224")
    frames = patch_video(8, batch=2, share=0.1)
    frames[5:, 1] = patch_video(3, batch=1, share=0.1, seed=9)[:, 0]  # stream 1 cuts at frame 5
    batched = fv.eventful(model, fv.TopR(5), cut_share=0.5, capture=True)
    alone = fv.eventful(model, fv.TopR(5), cut_share=0.5, capture=True)
    with torch.no_grad():
        outputs = [batched.forward_features(frame) for frame in frames]
        singles = [alone.forward_features(frame[:1]) for frame in frames]
        torch.testing.assert_close(outputs[6][1:], model.forward_features(frames[6][1:]), rtol=1e-5, atol=1e-5)
    assert FxGraphFrame.captures > 0
    for out, single in zip(outputs, singles):  # stream 0 never cut: as if alone
        torch.testing.assert_close(out[:1], single, rtol=1e-4, atol=1e-5)


def test_a_stream_reset_after_a_fused_frame_leaves_no_one_stream_sums() -> None:
    """A partial frame that ran fused attention keeps no sums; a one-stream full pass must not leave its own
    (batch 1) sums on the layer for the next incremental frame of the whole batch."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    ev = fv.eventful(model, fv.Threshold(0.0))
    frame = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ev(frame)
        ev(frame + 0.5 * torch.randn_like(frame))  # every token moves: fused attention, no sums kept
        ev.reset(stream=0)
        moved = frame.clone()
        moved[:, :, :16, :16] += 1
        ev(moved)
        again = moved.clone()
        again[:, :, 16:32, :16] += 1
        torch.testing.assert_close(ev(again), model(again), rtol=1e-4, atol=1e-4)


def test_held_frames_switched_back_on_do_not_return_an_old_output() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    ev = fv.eventful(model, fv.TopR(2), hold_share=0.2, cut_share=0.8)
    frame = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = ev.forward_features(frame)
        ev.hold_share = None
        for index in range(3):
            frame = frame.clone()
            frame[:, :, :16, 16 * index:16 * index + 16] += 1
            ev.forward_features(frame)
        ev.hold_share = 0.2
        frame = frame.clone()
        frame[:, :, 16:48, :] += 1
        out = ev.forward_features(frame)
    assert not ev.last_frame_held and not torch.equal(out, first)  # nothing fresh to hold: computed
