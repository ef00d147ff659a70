#!/usr/bin/env bash
# Train benchmarks/dvt_focus_trained.py's models (glance + locator, focus, the 7x7 reference) on a GPU host
# that has no PyAV, from the same sources file as dvt_real_gpu_train.sh.
#
#   here:  python3 benchmarks/dvt_real.py --prepare-sources .gpu/dvt/sources.npz
#   there: benchmarks/dvt_focus_trained_gpu.sh .gpu/dvt/sources.npz OUTDIR [EPOCHS] [SECONDS] [DEVICE]
#   here:  tar xzf OUTDIR/dvt_focus_trained.tgz -C WORK
#          python3 benchmarks/dvt_focus_trained.py --work-dir WORK --data DATA --phases evaluate
#
# Makes 96,000 training images, then trains in two processes at once (small models leave the GPU idle between
# kernel launches): the glance then the focus (on the trained glance's crops), and the 7x7 model. Every model
# gets EPOCHS (default 15) unless a timed probe says fewer fit SECONDS per model (default 150; the 7x7 model,
# alone in its process, twice that). DVT_CONTROL=1 also trains the 7x7 model with the glance's box loss (a
# control: does box supervision alone make the single model better?) in a third process.
set -uo pipefail
sources=$1 out=$2 epochs=${3:-15} budget=${4:-150} device=${5:-cuda}
work=${DVT_WORK:-/tmp/frugalvit-dvt-gpu}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$work" "$out"
python3 benchmarks/dvt_real.py --work-dir "$work" --parts trained --data-counts "${DVT_COUNTS:-96000,2000,2000}" \
    --sources "$sources" --train-only --data-only --workers "${DVT_WORKERS:-16}" || exit 1
common=(--work-dir "$work" --epochs "$epochs" --batch-size 256 --lr 2e-3 --amp bf16 --device "$device"
        --threads 4 --seed "${DVT_SEED:-0}")
limit=$((2 * budget + 120))
timeout $limit python3 benchmarks/dvt_focus_trained.py "${common[@]}" --phases glance,focus \
    --time-budget "$budget" > "$work/looks.log" 2>&1 &
timeout $limit python3 benchmarks/dvt_focus_trained.py "${common[@]}" --phases full \
    --time-budget $((2 * budget)) > "$work/full.log" 2>&1 &
names="looks full"
if [ "${DVT_CONTROL:-0}" = 1 ]; then  # the 7x7 model trained with the box loss too (a control), a third process
    timeout $limit python3 benchmarks/dvt_focus_trained.py "${common[@]}" --phases full_box \
        --time-budget $((2 * budget)) > "$work/full_box.log" 2>&1 &
    names="$names full_box"
fi
wait
for name in $names; do
    tr '\r' '\n' < "$work/$name.log" | grep -E -v '^epoch [0-9]+/[0-9]+: +[0-9]{1,2}%' | tail -200 \
        > "$out/dvt_focus_train_$name.log"
    grep -h "per epoch\|trained in\|crops\|Error" "$work/$name.log" | tr '\r' '\n' | grep -v "it/s"
done
tar czf "$out/dvt_focus_trained.tgz" -C "$work" --exclude checkpoint.pt focus_trained
ls -la "$out"
