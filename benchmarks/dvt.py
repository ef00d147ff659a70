"""DVT benchmark: accuracy vs mean MACs of cascades (with/without each reuse) against single models, on MNIST.

Trains (or resumes) four 3-stage cascades that differ only in reuse, calibrates
thresholds on the validation split for a sweep of budgets, evaluates the real
early-exit forward on the test split, compares the threshold searches, and
times batch 1 and batch 64 against the full-token single model.

Without reuse the stages share no parameters, so joint training with the sum
of losses (AdamW is per-parameter) trains each stage exactly as it would be
trained alone: those stages *are* the single-model baselines.

    python benchmarks/dvt.py --work-dir /tmp/frugalvit-dvt-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from frugalvit.cost import CostCounter
from frugalvit.data import load_dataset
from frugalvit.dvt import (DVTConfig, cascade_loss, evaluate_thresholds, genetic_search, geometric_search,
                           search_thresholds)
from frugalvit.training import TrainConfig, save_atomically, train

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"none": (False, False), "feature": (True, False), "relation": (False, True), "both": (True, True)}
BASE = DVTConfig(image_size=28, patch_sizes=(14, 7, 4), in_chans=1, num_classes=10, embed_dim=96, depth=4,
                 num_heads=3, context_dim=16)


def train_variants(work_dir: Path, train_config: TrainConfig, data, names) -> dict:
    models = {}
    for name in names:
        feature, relation = VARIANTS[name]
        config = replace(BASE, feature_reuse=feature, relation_reuse=relation)
        run = work_dir / name
        final = run / "model.pt"
        torch.manual_seed(train_config.seed)  # same initial stage weights in every variant
        cascade = config.build()
        if final.is_file():
            cascade.load_state_dict(torch.load(final, map_location="cpu"))
        else:
            start = time.perf_counter()
            train(cascade, data.train, train_config, run, loss_fn=cascade_loss, progress=True)
            save_atomically(cascade.state_dict(), final)
            print(f"[{name}] trained in {time.perf_counter() - start:.0f}s", flush=True)
        models[name] = cascade.eval()
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/frugalvit-dvt-bench"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--variants", default="none,both,feature,relation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    train_config = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, max_train_samples=args.train_samples)
    models = train_variants(args.work_dir, train_config, data, args.variants.split(","))
    if args.train_only:
        return


if __name__ == "__main__":
    main()
