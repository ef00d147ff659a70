#!/usr/bin/env bash
# Train the scaled-digits DVT cascades of benchmarks/dvt_real.py on a GPU host that has no PyAV.
#
#   here:  python3 benchmarks/dvt_real.py --prepare-sources .gpu/dvt/sources.npz     # digits + decoded backgrounds
#   there: benchmarks/dvt_real_gpu_train.sh .gpu/dvt/sources.npz OUTDIR [SECONDS] [DEVICE]
#   here:  for f in OUTDIR/dvt_trained_*.tgz; do tar xzf $f -C WORK; done; python3 benchmarks/dvt_real.py --work-dir WORK
#
# Makes 96,000 training images from the sources file (16 processes), then trains the four cascades (no reuse,
# both reuses, feature only, relation only) at once, one process each, for as many epochs as a timed probe says
# fit SECONDS (default 270); packs each cascade's weights, train.json and log into OUTDIR/dvt_trained_NAME.tgz.
set -uo pipefail
sources=$1 out=$2 budget=${3:-270} device=${4:-cuda}
work=${DVT_WORK:-/tmp/frugalvit-dvt-gpu}
counts=${DVT_COUNTS:-96000,2000,2000}
common=(--work-dir "$work" --parts trained --data-counts "$counts" --sources "$sources" --train-only)
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$work" "$out"
python3 benchmarks/dvt_real.py "${common[@]}" --data-only --workers "${DVT_WORKERS:-16}" || exit 1
for variant in none both feature relation; do
    timeout $((budget + 150)) python3 benchmarks/dvt_real.py "${common[@]}" --variants "$variant" --device "$device" \
        --batch-size 256 --lr 2e-3 --amp bf16 --epochs "${DVT_EPOCHS:-60}" --time-budget "$budget" \
        > "$work/train_$variant.log" 2>&1 &
done
wait
grep -h "per epoch\|trained in\|Error\|error" "$work"/train_*.log
for variant in none both feature relation; do  # one archive each: the device returns files of at most 16 MiB
    tar czf "$out/dvt_trained_$variant.tgz" -C "$work" --exclude checkpoint.pt "trained/$variant" "train_$variant.log"
done
ls -la "$out"
