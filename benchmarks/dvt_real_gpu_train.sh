#!/usr/bin/env bash
# Train the scaled-digits DVT cascades of benchmarks/dvt_real.py on a GPU host that has no PyAV.
#
#   here:  python3 benchmarks/dvt_real.py --prepare-sources .gpu/dvt/sources.npz     # digits + decoded backgrounds
#   there: benchmarks/dvt_real_gpu_train.sh .gpu/dvt/sources.npz OUTDIR [SECONDS] [DEVICE]
#   here:  for f in OUTDIR/dvt_trained_*.tgz; do tar xzf $f -C WORK; done; python3 benchmarks/dvt_real.py --work-dir WORK
#
# Makes 96,000 training images from the sources file (16 processes), then trains the cascades DVT_VARIANTS
# (default none,both; also feature, relation) one after another, each for as many epochs as a timed probe says
# fit SECONDS (default 270), from initial weights and a data order drawn with DVT_SEED (default 0); packs each
# cascade's weights and train.json into OUTDIR/dvt_trained_NAME.tgz and the log into OUTDIR/dvt_train_NAMES.log.
set -uo pipefail
sources=$1 out=$2 budget=${3:-270} device=${4:-cuda}
work=${DVT_WORK:-/tmp/frugalvit-dvt-gpu}
IFS=, read -r -a variants <<< "${DVT_VARIANTS:-none,both}"
counts=${DVT_COUNTS:-96000,2000,2000}
common=(--work-dir "$work" --parts trained --data-counts "$counts" --sources "$sources" --train-only)
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$work" "$out"
python3 benchmarks/dvt_real.py "${common[@]}" --data-only --workers "${DVT_WORKERS:-16}" || exit 1
# one process, the cascades one after another: four processes sharing the GPU time-slice it (first H200 run)
timeout $((${#variants[@]} * (budget + 60) + 60)) python3 benchmarks/dvt_real.py "${common[@]}" \
    --variants "$(IFS=,; echo "${variants[*]}")" --device "$device" --batch-size 256 --lr 2e-3 --amp bf16 \
    --epochs "${DVT_EPOCHS:-60}" --seed "${DVT_SEED:-0}" --time-budget "$budget" 2>&1 | tr '\r' '\n' > "$work/train.log"
grep -h "per epoch\|trained in\|Error\|error" "$work/train.log"
for variant in "${variants[@]}"; do  # one archive each: the device returns files of at most 16 MiB
    tar czf "$out/dvt_trained_$variant.tgz" -C "$work" --exclude checkpoint.pt "trained/$variant"
done
names=$(IFS=_; echo "${variants[*]}")  # one log per call: a second call with other variants keeps the first's
grep -E -v '^epoch [0-9]+/[0-9]+: +[0-9]{1,2}%' "$work/train.log" | tail -300 > "$out/dvt_train_$names.log"
ls -la "$out"
