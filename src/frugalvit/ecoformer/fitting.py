"""Self-supervised learning of the hash functions (an explicit step, never inside `forward`).

Labels come from attention itself: in every row of an attention score matrix
the `top_l` most similar tokens are labelled +1 and the `top_l` least similar
-1 (the rest 0). Hash functions are then learnt bit by bit (discrete cyclic
coordinate descent, as in kernel-based supervised hashing): bit r minimises
`-y^T R y` with `y = sign(K a_r)` over the residual `R = b Y - sum_{t<r} y_t y_t^T`,
by gradient descent through the straight-through sign, keeping the best
discrete solution seen (never worse than the starting one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from frugalvit.data import model_input
from frugalvit.ecoformer.attention import EcoFormerAttention
from frugalvit.ecoformer.convert import ecoformer_layers
from frugalvit.ecoformer.hashing import rbf_features, sign_ste
from frugalvit.timing import model_device_dtype

Supervision = Literal["attention", "tied"]


@dataclass(frozen=True)
class HashState:
    """Fitted hash functions of one layer: anchors (H, m, D), bandwidth (H,), mean (H, m), weights (H, b, m)."""

    anchors: Tensor
    bandwidth: Tensor
    mean: Tensor
    weights: Tensor


def similarity_labels(scores: Tensor, top_l: int) -> Tensor:
    """Pairwise labels `(..., N, N)`: +1 on each row's `top_l` largest scores, -1 on its `top_l` smallest, else 0."""
    tokens = scores.shape[-1]
    if not 1 <= top_l <= tokens // 2:
        raise ValueError(f"top_l must be in [1, {tokens // 2}] for {tokens} tokens, got {top_l}")
    labels = torch.zeros_like(scores)
    labels.scatter_(-1, scores.topk(top_l, dim=-1).indices, 1.0)
    labels.scatter_(-1, scores.topk(top_l, dim=-1, largest=False).indices, -1.0)
    return labels


def init_hash_state(tokens: Tensor, bits: int, anchors: int, generator: torch.Generator) -> HashState:
    """Anchors drawn from the calibration tokens `(S, H, N, D)`, bandwidth = mean squared token-anchor distance."""
    samples, heads, count, width = tokens.shape
    pool = tokens.transpose(0, 1).reshape(heads, samples * count, width)
    if anchors > pool.shape[1]:
        raise ValueError(f"{anchors} anchors need at least as many calibration tokens, got {pool.shape[1]}; "
                         "pass more images or use fewer anchors")
    index = torch.stack([torch.randperm(pool.shape[1], generator=generator)[:anchors] for _ in range(heads)])
    chosen = torch.gather(pool, 1, index.to(tokens.device)[..., None].expand(-1, -1, width))
    dot = torch.matmul(tokens, chosen.transpose(-1, -2))
    squared = (tokens * tokens).sum(-1, keepdim=True) + (chosen * chosen).sum(-1).unsqueeze(-2) - 2 * dot
    bandwidth = squared.clamp_min(0).mean(dim=(0, 2, 3)).clamp_min(1e-6)
    mean = rbf_features(tokens, chosen, bandwidth).mean(dim=(0, 2))
    weights = torch.randn(heads, bits, anchors, generator=generator).to(tokens)
    return HashState(chosen, bandwidth, mean, weights)


def _bit_loss(codes: Tensor, residual: Tensor, bits: int) -> Tensor:
    """Per-head objective `-mean_s y^T R y / (N b)` for codes `(S, H, N)` and residual `(S, H, N, N)`."""
    quad = torch.einsum("shn,shnm,shm->sh", codes, residual, codes)
    return -(quad / (codes.shape[-1] * bits)).mean(0)


def fit_hash_functions(tokens: Tensor, labels: Tensor, bits: int, anchors: int, *, iterations: int = 100,
                       lr: float = 0.05, generator: torch.Generator | None = None,
                       init: HashState | None = None, labelled_only: bool = False) -> HashState:
    """Learn `bits` hash functions per head from tokens `(S, H, N, D)` and pairwise labels `(S, H, N, N)`.

    `init` warm-starts from an earlier fit (same anchors, bandwidth and mean;
    each bit is only replaced by a better one), as when re-fitting every few
    epochs. Each weight row is rescaled so its activations have unit spread on
    the calibration tokens: the codes do not change, and the straight-through
    gradient window |u| <= 1 stays meaningful during fine-tuning.

    The objective is the paper's `||b Y - H H^T||_F^2` over all pairs, unlabelled
    pairs having target 0 (as in the authors' code); `labelled_only=True`
    restricts it to the labelled pairs (as in KSH), leaving the others free.

    The fit runs on the tokens' device in float32 whatever their dtype (an
    optimisation with a residual summed over all bits); the state is float32.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    tokens, labels = tokens.detach().float(), labels.detach().float()
    if init is not None:
        init = HashState(*(tensor.detach().to(tokens.device, torch.float32) for tensor in
                           (init.anchors, init.bandwidth, init.mean, init.weights)))
    state = init if init is not None else init_hash_state(tokens, bits, anchors, generator)
    features = rbf_features(tokens, state.anchors, state.bandwidth) - state.mean.unsqueeze(-2)  # (S, H, N, m)
    labels = 0.5 * (labels + labels.transpose(-1, -2))
    mask = (labels != 0).to(labels) if labelled_only else torch.ones_like(labels)
    residual = bits * labels
    weights = state.weights.clone()
    for bit in range(bits):
        start = weights[:, bit].clone()                                                   # (H, m)
        with torch.no_grad():
            best_loss = _bit_loss(sign_ste(torch.einsum("shnm,hm->shn", features, start)), residual, bits)
        best = start.clone()
        param = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=lr)
        for _ in range(iterations):
            loss = _bit_loss(sign_ste(torch.einsum("shnm,hm->shn", features, param)), residual, bits)
            with torch.no_grad():  # `loss` is the exact discrete objective of the current weights
                better = loss < best_loss
                best[better] = param[better]
                best_loss = torch.where(better, loss, best_loss)
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
        with torch.no_grad():
            activations = torch.einsum("shnm,hm->shn", features, best)
            spread = activations.transpose(0, 1).reshape(activations.shape[1], -1).std(-1).clamp_min(1e-6)
            weights[:, bit] = best / spread[:, None]
            codes = sign_ste(activations)
            residual -= mask * (codes.unsqueeze(-1) * codes.unsqueeze(-2))
    return HashState(state.anchors, state.bandwidth, state.mean, weights.detach())


def load_hash_state(layer: EcoFormerAttention, state: HashState) -> None:
    """Copy a fitted state into a layer's buffers and mark it fitted."""
    with torch.no_grad():
        layer.hash_anchors.copy_(state.anchors)
        layer.hash_bandwidth.copy_(state.bandwidth)
        layer.hash_mean.copy_(state.mean)
        layer.hash_weights.copy_(state.weights)
        layer.hash_fitted.fill_(True)


def layer_hash_state(layer: EcoFormerAttention) -> HashState:
    """A layer's current hash state (copies of its buffers)."""
    return HashState(layer.hash_anchors.clone(), layer.hash_bandwidth.clone(), layer.hash_mean.clone(),
                     layer.hash_weights.clone())


@torch.no_grad()
def _capture_inputs(model: nn.Module, layers: dict[str, EcoFormerAttention], images: Tensor, batch_size: int,
                    hashing: dict[str, bool]) -> dict[str, Tensor]:
    captured: dict[str, list[Tensor]] = {name: [] for name in layers}
    saved = {name: layer.hashing for name, layer in layers.items()}
    device, dtype = model_device_dtype(model)
    handles = [layer.register_forward_pre_hook(lambda module, args, name=name: captured[name].append(args[0]))
               for name, layer in layers.items()]
    try:
        for name, layer in layers.items():
            layer.hashing = hashing[name]
        for start in range(0, len(images), batch_size):
            model(model_input(images[start:start + batch_size], device, dtype))
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            layer.hashing = saved[name]
    return {name: torch.cat(chunks) for name, chunks in captured.items()}


def fit_hashes(model: nn.Module, images: Tensor, *, supervision: Supervision = "attention",
               top_l: int | None = None, iterations: int = 100, lr: float = 0.05, batch_size: int = 64,
               seed: int = 0, warm_start: bool = False, labelled_only: bool = False,
               progress: bool = False) -> nn.Module:
    """Fit the hash functions of every EcoFormer layer of `model` from calibration `images`; returns `model`.

    Args:
        supervision: "attention" labels pairs by the softmax attention of the
            original (pretrained) query/key projections, with every converted
            layer running softmax attention, i.e. the pretrained model's own
            attention; "tied" labels them by the similarity of the current tied
            projection, with fitted layers hashing (the authors' re-learning
            during fine-tuning).
        top_l: similar/dissimilar pairs per row; None takes max(1, N // 8).
        iterations: gradient steps per bit.
        warm_start: keep anchors, bandwidth and centring of already-fitted
            layers and only replace bits that improve (for re-fitting).
        labelled_only: fit only the labelled pairs (see `fit_hash_functions`).

    `images` may stay on the CPU: batches follow the model's device and dtype.
    The fit itself runs in float32; the buffers keep the model's dtype.
    """
    if supervision not in ("attention", "tied"):
        raise ValueError(f"supervision must be 'attention' or 'tied', got {supervision!r}")
    layers = ecoformer_layers(model)
    if not layers:
        raise ValueError("model has no EcoFormer layers: convert it first with frugalvit.ecoformer(model)")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    hashing = {name: supervision == "tied" and layer.fitted and layer.hashing for name, layer in layers.items()}
    inputs = _capture_inputs(model, layers, images, batch_size, hashing)
    generator = torch.Generator().manual_seed(seed)
    try:
        for name, layer in tqdm(layers.items(), desc="fitting hashes", disable=not progress):
            x = inputs[name]
            with torch.no_grad():
                tokens = layer.tied_tokens(x)
                scores = layer.softmax_logits(x) if supervision == "attention" else tokens @ tokens.transpose(-1, -2)
            count = tokens.shape[-2]
            labels = similarity_labels(scores, top_l if top_l is not None else max(1, count // 8))
            init = layer_hash_state(layer) if warm_start and layer.fitted else None
            state = fit_hash_functions(tokens, labels, layer.bits, layer.num_anchors, iterations=iterations, lr=lr,
                                       generator=generator, init=init, labelled_only=labelled_only)
            load_hash_state(layer, state)
    finally:
        model.train(was_training)
    return model
