#!/usr/bin/env bash
# Evaluate and time benchmarks/dvt_focus_trained.py's trained models on a GPU host without PyAV: statistics,
# thresholds from validation, the real early exit and the wall clock against the dense 7x7 model, all there.
#
#   here:  python3 benchmarks/dvt_real.py --prepare-sources .gpu/focus/heldout.npz --source-splits val,test
#          mkdir -p .gpu/focus && cp -r WORK/focus_trained .gpu/focus/    # model.pt and train.json of each model
#   there: benchmarks/dvt_focus_trained_gpu_eval.sh .gpu/focus/heldout.npz .gpu/focus/focus_trained OUT [DEVICE]
#
# The validation and test splits are made there from the held-out sources (identical chunks); the result is
# OUT/dvt_focus_trained_gpu.json and its plot.
set -uo pipefail
heldout=$1 models=$2 out=$3 device=${4:-cuda}
work=${DVT_WORK:-/tmp/frugalvit-dvt-focus-eval}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$work/focus_trained" "$out"
for name in glance focus full full_box; do
    [ -f "$models/$name/model.pt" ] || continue
    mkdir -p "$work/focus_trained/$name" && cp "$models/$name/model.pt" "$models/$name/train.json" \
        "$work/focus_trained/$name/"
done
python3 benchmarks/dvt_focus_trained.py --work-dir "$work" --phases evaluate --eval-device "$device" \
    --sources "$heldout" --workers "${DVT_WORKERS:-16}" --threads 4 --out "$out/dvt_focus_trained_gpu.json" 2>&1 | grep -v "^\s*$"
