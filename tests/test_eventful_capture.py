"""Graph capture of eventful frames (`capture=True`), checked on the CPU.

A CUDA graph replays fixed kernels on fixed addresses: it is only correct if
every frame reads and writes the state in place. Two CPU checks stand in for
the GPU: the state tensors stay the same objects at the same addresses frame
after frame (full frames included), and a recorder with CUDA-graph semantics
(an FX graph traced once, holding the state tensors as constants, replayed
afterwards) reproduces the eager frames.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

import frugalvit as fv
from frugalvit.eventful.model import CudaGraphFrame, EventfulViT
from test_eventful import make_model, patch_video


class FxGraphFrame(CudaGraphFrame):
    """CPU stand-in for `CudaGraphFrame`: trace once, replay the fixed op list on the same state tensors.

    Tracing runs the ops (a CUDA capture does not), so the state is restored after tracing: the trace, like
    a capture, leaves the state as it found it.
    """

    captures = 0

    @staticmethod
    def available(device: torch.device) -> bool:
        return True

    @staticmethod
    def warm_up(frame: Callable[[Tensor], Tensor], tokens: Tensor) -> Tensor:
        return frame(tokens)

    def __init__(self, key: tuple[object, ...], frame: Callable[[Tensor], Tensor], example: Tensor) -> None:
        FxGraphFrame.captures += 1
        self.key = key
        owner = frame.__closure__[0].cell_contents  # the EventfulViT whose state the frame updates
        saved = [(t, t.clone()) for t in owner.state_tensors()]
        self.graph = make_fx(frame)(example.clone())
        for tensor, value in saved:
            tensor.copy_(value)

    def replay(self, tokens: Tensor) -> Tensor:
        return self.graph(tokens).clone()


def state_ids(ev: EventfulViT) -> list[tuple[int, int]]:
    return [(id(t), t.data_ptr()) for t in ev.state_tensors()]


@pytest.mark.parametrize("selection", ["per_gate", "shared"])
@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2",
                                  "vit_small_patch16_224"])
def test_state_is_written_in_place_across_frames(name: str, selection: str) -> None:
    """After the first partial frame no state tensor is replaced, not even by a refresh (full) frame."""
    model = make_model(name)
    ev = fv.eventful(model, fv.TopFraction(0.2), refresh_every=3, capture=True, token_selection=selection)
    frames = patch_video(8, share=0.2)
    with torch.no_grad():
        ev(frames[0])
        ev(frames[1])
        before = state_ids(ev)
        full = []
        for frame in frames[2:]:
            ev(frame)
            full.append(ev.last_frame_full)
            assert state_ids(ev) == before
    assert any(full) and not all(full)


@pytest.mark.parametrize("selection", ["per_gate", "shared"])
@pytest.mark.parametrize("policy", [fv.TopR(4), fv.TopFraction(0.2), fv.TopFraction(0.5), fv.TopR(0)],
                         ids=["topr", "fraction", "dense-attention", "none"])
def test_replayed_frames_equal_eager_frames(policy: fv.TokenPolicy, selection: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture with CUDA-graph semantics (fixed ops on fixed tensors) gives the eager frames' outputs,
    across refreshes, a policy change (recapture) and a reset."""
    monkeypatch.setattr(EventfulViT, "recorder", FxGraphFrame)
    FxGraphFrame.captures = 0
    model = make_model("deit3_small_patch16_224")
    options = {"refresh_every": 4, "token_selection": selection}
    eager, captured = fv.eventful(model, policy, **options), fv.eventful(model, policy, capture=True, **options)
    eager.sync_free = True
    frames = patch_video(11, share=0.2)
    with torch.no_grad():
        for index, frame in enumerate(frames):
            if index == 7:  # the budget changes at run time: the next partial frames warm up and recapture
                eager.policy = captured.policy = fv.TopFraction(0.1)
            torch.testing.assert_close(captured(frame), eager(frame), rtol=1e-5, atol=1e-5)
            assert captured.attention_paths() == eager.attention_paths()
            torch.testing.assert_close(captured.updated_tokens(), eager.updated_tokens())
        assert FxGraphFrame.captures == 2
        eager.reset()
        captured.reset()
        for frame in frames[:4]:
            torch.testing.assert_close(captured(frame), eager(frame), rtol=1e-5, atol=1e-5)
    assert FxGraphFrame.captures == 3


def test_capture_outputs_are_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """An output kept from one frame is not overwritten by the next replay."""
    monkeypatch.setattr(EventfulViT, "recorder", FxGraphFrame)
    ev = fv.eventful(make_model("vit_tiny_patch16_224"), fv.TopFraction(0.25), capture=True)
    frames = patch_video(6, share=0.3)
    with torch.no_grad():
        outputs = [ev(frame) for frame in frames]
        kept = [out.clone() for out in outputs]
        ev(frames[0])
    for out, copy in zip(outputs, kept):
        assert torch.equal(out, copy)


def test_capture_needs_a_fixed_size_policy() -> None:
    ev = fv.eventful(make_model("vit_tiny_patch16_224"), fv.Threshold(0.1), capture=True)
    with pytest.raises(ValueError, match="fixed-size policy"):
        ev(patch_video(1)[0])
    with pytest.raises(TypeError, match="capture must be True or False"):
        ev.capture = 1


@pytest.mark.parametrize("selection", ["per_gate", "shared"])
def test_compiled_frames_keep_distinct_state_and_equal_eager(selection: str) -> None:
    """With the real compiler (inductor), the state stays one buffer per tensor and the frames equal eager.

    Inductor drops copies it considers no-ops and may then hand two state tensors that hold one value the
    same buffer; in-place updates of one would then corrupt the other (seen once, now guarded by layout).
    """
    model = make_model("vit_tiny_patch16_224", depth=1)
    eager, compiled = (fv.eventful(model, fv.TopFraction(0.25), token_selection=selection) for _ in range(2))
    eager.sync_free = compiled.sync_free = True
    torch._dynamo.reset()
    compiled.step = torch.compile(compiled.step, fullgraph=True)
    with torch.no_grad():
        for frame in patch_video(4, share=0.3):
            torch.testing.assert_close(compiled(frame), eager(frame), rtol=1e-4, atol=1e-4)
            storages = [t.untyped_storage().data_ptr() for t in compiled.state_tensors()]
            assert len(set(storages)) == len(storages)
    torch._dynamo.reset()


@pytest.mark.parametrize("selection", ["per_gate", "shared"])
def test_compile_eventful_warms_up_every_graph_a_clip_needs(selection: str) -> None:
    """After `compile_eventful` a clip with a reset, partial frames, a refresh, a scene cut and held frames runs
    without one recompilation (it would stall a timed frame), and its frames equal an eager sync-free twin's."""
    model = make_model("vit_tiny_patch16_224", depth=1)
    settings = dict(cut_share=0.6, hold_share=0.45, token_selection=selection)
    eager, compiled = (fv.eventful(model, fv.TopFraction(0.25), **settings) for _ in range(2))
    eager.sync_free = True
    clip = torch.cat([patch_video(4, share=0.3), patch_video(3, share=0.5, seed=1), patch_video(3, share=1.0, seed=2)])
    torch._dynamo.reset()
    assert fv.compile_eventful(compiled, clip[0]) is compiled
    assert compiled.sync_free
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for replay in range(2):
            eager.reset(), compiled.reset()
            kinds = set()
            for index, frame in enumerate(clip):
                if index == 5:
                    eager.refresh(), compiled.refresh()
                torch.testing.assert_close(compiled(frame), eager(frame), rtol=1e-4, atol=1e-4)
                assert (compiled.last_frame_full, compiled.last_frame_held) == (eager.last_frame_full,
                                                                                eager.last_frame_held)
                kinds.add((compiled.last_frame_full, compiled.last_frame_held))
            assert kinds == {(True, False), (False, False), (False, True)}  # full, partial and held frames ran
    torch._dynamo.reset()


def test_compile_eventful_needs_a_fixed_size_policy() -> None:
    ev = fv.eventful(make_model("vit_tiny_patch16_224", depth=1), fv.RelativeThreshold(0.1))
    with pytest.raises(ValueError, match="fixed-size policy"):
        fv.compile_eventful(ev, patch_video(1)[0])
    with pytest.raises(TypeError, match="pass frugalvit.eventful"):
        fv.compile_eventful(ev.model, patch_video(1)[0])
    ev.policy = fv.TopFraction(0.5)
    with pytest.raises(ValueError, match="always compiles with fullgraph=True"):
        fv.compile_eventful(ev, patch_video(1)[0], fullgraph=False)


def test_compile_eventful_again_after_a_new_budget_warms_up_without_wrapping_twice() -> None:
    model = make_model("vit_tiny_patch16_224", depth=1)
    ev, eager = fv.eventful(model, fv.TopFraction(0.25)), fv.eventful(model, fv.TopFraction(0.5))
    eager.sync_free = True
    clip = patch_video(4, share=0.3)
    torch._dynamo.reset()
    fv.compile_eventful(ev, clip[0])
    step = ev.step
    ev.policy = fv.TopFraction(0.5)
    fv.compile_eventful(ev, clip[0])
    assert ev.step is step
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for frame in clip:
            torch.testing.assert_close(ev(frame), eager(frame), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
