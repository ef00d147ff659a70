"""Model construction: the project's small ViTs, and timm models from the hub, a file or random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

# the real pretrained ViT that works offline
from frugalvit.saliency import SaliencyViT, saliency_vit, saliency_vit_from_weights, saliency_weights


def small_vit(image_size: int = 28, patch_size: int = 7, in_chans: int = 1, num_classes: int = 10,
              embed_dim: int = 192, depth: int = 6, num_heads: int = 3, **kwargs: object) -> VisionTransformer:
    """The project's reference small ViT: 6 blocks, 192 wide; on MNIST 28 px with 7 px patches (4x4 tokens).

    Extra keyword arguments go to timm's `VisionTransformer` (e.g. `class_token=False,
    global_pool="avg"`, `init_values=1e-5` for LayerScale, `reg_tokens=4`).
    """
    return VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_chans,
                             num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, **kwargs)


def load_timm_model(name: str, image_size: int | None = None, checkpoint: Path | None = None,
                    random_init: bool = False, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model in eval mode: pretrained from the hub, from a local checkpoint, or randomly initialised.

    Position embeddings are resampled when `image_size` differs from the weights'.
    With `random_init`, `seed` (if given) makes the weights reproducible without
    touching the caller's random state. A hub download is attempted only when
    the weights are not cached and the hub answers within a few seconds, so an
    offline machine fails at once instead of after a minute of retries.
    Raises ValueError with the fix when the model name is unknown or weights cannot be had.
    """
    import timm
    import torch

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; list candidates with timm.list_models('vit_*')")
    if checkpoint is not None and random_init:
        raise ValueError("choose either a checkpoint or random initialisation, not both")
    size = {"img_size": image_size} if image_size is not None else {}
    if random_init:
        try:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                return timm.create_model(name, pretrained=False, **size, **kwargs).eval()
        except TypeError as error:
            raise ValueError(f"{name} cannot be built with {size or kwargs} ({error}); "
                             "frugalvit converts timm VisionTransformer models") from error
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no such checkpoint file")
        kind = checkpoint_kind(checkpoint)
        expected = (f"expected the weights of {name}, saved with torch.save(model.state_dict(), FILE) or as "
                    ".safetensors")
        if kind.startswith("not "):
            raise ValueError(f"{checkpoint}: {kind}; {expected}")
        # With num_classes the file's head has that many classes: load it, strictly. timm would drop a head whose
        # class count differs from its config's and load the rest loosely, leaving missing weights random.
        # num_classes=0 asks for the features only: there the head is dropped.
        overlay: dict[str, object] = {"file": str(checkpoint)}
        if kwargs.get("num_classes"):
            overlay["num_classes"] = kwargs["num_classes"]
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **size, **kwargs).eval()
        except Exception as error:  # torch.load, safetensors and timm's filters raise many kinds
            detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            detail = (detail[:240] + " ...") if len(detail) > 240 else detail or type(error).__name__
            raise ValueError(f"{checkpoint}: a {kind}, but it cannot be loaded into {name} ({detail}); "
                             f"{expected}") from error
    cached = _cached_pretrained_file(name)
    if cached is not None:  # load the cached file directly: the hub would first retry the network when offline
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)},
                                 **size, **kwargs).eval()
    offline = _pretrained_unavailable(name)
    if offline is not None:
        raise ValueError(f"cannot get pretrained weights for {name} ({offline}); with no internet, pass a local "
                         "weights file (--checkpoint FILE) or use random weights (--random-init)")
    try:
        return timm.create_model(name, pretrained=True, **size, **kwargs).eval()
    except Exception as error:  # the hub raises many kinds: offline, not found, HTTP errors
        raise ValueError(f"cannot get pretrained weights for {name} ({type(error).__name__}); with no internet, "
                         "pass a local weights file (--checkpoint FILE) or use random weights (--random-init)"
                         ) from error


def checkpoint_kind(path: Path) -> str:
    """What the file at `path` looks like: "PyTorch checkpoint", "safetensors checkpoint", ... or "not a ...".

    Read from the first bytes only (nothing is unpickled), so that a wrong file
    is reported as what it is instead of as an obscure unpickling error.
    """
    import zipfile

    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(512)
    not_checkpoint = "not a PyTorch/safetensors checkpoint: looks like"
    if size == 0:
        return f"{not_checkpoint} an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return f"{not_checkpoint} a damaged zip archive ({size} bytes)"
        if any(entry.endswith("data.pkl") for entry in names):
            return "PyTorch checkpoint"
        if names and all(entry.endswith(".npy") for entry in names):
            return "NumPy .npz checkpoint"
        return f"{not_checkpoint} a zip archive of {len(names)} file(s) with no PyTorch data.pkl ({size} bytes)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "PyTorch checkpoint (legacy pickle format)"
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(char.isprintable() or char in "\n\r\t" for char in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"{not_checkpoint} text ({size} bytes, starting {first!r})"
    return f"{not_checkpoint} {size} bytes of unrecognised binary data"


def _cached_pretrained_file(name: str) -> Path | None:
    """The locally cached weights file of timm's default pretrained tag for `name` (HF or torch hub cache), if any."""
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    if config is None:
        return None
    hub_id, url = getattr(config, "hf_hub_id", None), getattr(config, "url", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        for filename in filter(None, (getattr(config, "hf_hub_filename", None), "model.safetensors",
                                      "pytorch_model.bin")):
            found = try_to_load_from_cache(hub_id, filename) if try_to_load_from_cache else None
            if isinstance(found, str):
                return Path(found)
    if url:
        import torch.hub

        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if candidate.is_file() and candidate.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            return candidate
    return None


def _pretrained_unavailable(name: str, timeout: float = 3.0) -> str | None:
    """Why pretrained weights for `name` cannot be downloaded now, or None when the hub is reachable.

    Resolves and connects to the hub's host (or the HTTPS proxy) with a short
    timeout; HF_HUB_OFFLINE=1 counts as offline.
    """
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    if config is None:
        return "timm has no pretrained weights for this name"
    hub_id, url = getattr(config, "hf_hub_id", None), getattr(config, "url", None)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and the weights are not cached"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hub_id else url
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else endpoint or "https://huggingface.co")
    host, port = target.hostname or "", target.port or (80 if target.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:  # getaddrinfo has no timeout of its own: run it where we can stop waiting
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as error:
            outcome.append(f"{host} unreachable: {error.strerror or error}")

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"{host} did not answer within {timeout:.0f} s"
