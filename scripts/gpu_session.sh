#!/usr/bin/env bash
# Everything this project needs a GPU for, in ONE call of under 10 minutes on one lent H100/H200 (a session is lent
# 15 minutes of device time in all, start included, so there is one shot). Two phases:
#   A (quiet machine, ~3 min): `ffpipe bench` on the GPU: ff-inprocess, ff-pipeline and bp-inprocess at 1, 2 and 4
#     stages of 4096 units, batch 1024, every stage on the one card (bench issue); data decoded meanwhile (CPU);
#     then scripts/gpu_finite_check.py (a NaN batch refused on the device, a few seconds).
#   B (~5 min, runs side by side on the one GPU and 16 cores, so wall times are upper bounds):
#     check-*/        the hinton preset on MNIST, pipelined on cuda, then in-process on cuda (pipeline issue)
#     seed-*/         the seed report's recipe (`seed` preset) on MNIST, FER2013 and CIFAR-10 (results issue)
#     cifar-a/        convolutional competitive FF on CIFAR-10, pipelined, every stage on cuda, 35 epochs
#     cifar-lc/       the non-convolutional goal: locally connected competitive FF on CIFAR-10, whitened, pipelined, 20 epochs
# (bp-gpipe/bp-1f1b are left out: NCCL refuses two ranks on one GPU, as the first GPU session recorded.)
# Every run is bounded by `timeout`; one stopped by it keeps its assembled checkpoint, which is then evaluated
# on the test set once (test-eval.json). Everything comes back as $OUT/gpu-results.tar.gz (+ checkpoints tarred).
#
# Prepare here, once (both folders are git-ignored and travel with `carry`, about 52 MB):
#   mkdir -p .whl .gpu-data/MNIST/raw && cp ../shared/wheels/pyzmq-*.whl .whl/
#   cp ../shared/data/MNIST/raw/*.gz .gpu-data/MNIST/raw/ && cp ../shared/data/*-jpg.tar.gz .gpu-data/
# Then: run(command="bash scripts/gpu_session.sh", carry=[".whl", ".gpu-data"], timeout_s=590)
# DRY=1 runs the same plan tiny and on the CPU, to check the script itself.
set -uo pipefail
OUT="${OUT:-results/gpu-session}"
R=/tmp/gpu-results
DRY="${DRY:-0}"
END="${END:-500}"  # seconds after the start by which every run has stopped
rm -rf "$R" && mkdir -p "$R" "$OUT"
if [ "$DRY" = 1 ]; then
  export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 FFPIPE_CACHE="${FFPIPE_CACHE:-$HOME/.cache/ffpipe}"
  DEV=cpu; DATA="${DATA:-../shared/data}"
else
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 FFPIPE_CACHE=/tmp/ffpipe-cache
  DEV=cuda; DATA=.gpu-data
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$R/gpu.txt"
  nproc >> "$R/gpu.txt"
fi
python3 -c "import torch, zmq; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zmq', zmq.__version__)" | tee -a "$R/gpu.txt"
pack() {  # what has come so far, in two files under $OUT (at most 8 files come back); atomic, as jobs call it too
  local t="$OUT/.pack.$BASHPID"
  tar -C "$R" --exclude='*.pt' --exclude='runs' -czf "$t.a" . 2>/dev/null && mv -f "$t.a" "$OUT/gpu-results.tar.gz"
  (cd "$R" && find . -name checkpoint.pt -size -8M -print0 | tar --null -T - -czf "$t.b" 2>/dev/null) \
    && mv -f "$t.b" "$OUT/gpu-checkpoints.tar.gz"
  rm -f "$t.a" "$t.b"
}
left() { echo $(( END - SECONDS )); }
# one ffpipe run, bounded; a stopped one is evaluated on the test set from its assembled checkpoint
job() {
  local name=$1 limit=$2; shift 2
  local lim=$(( limit < $(left) ? limit : $(left) ))
  if [ "$lim" -lt 20 ]; then echo "$name: skipped, no time left" | tee "$R/$name.log"; return; fi
  echo "[$SECONDS s] $name: start (limit ${lim}s)"
  timeout -s TERM -k 20 "$lim" python3 -m ffpipe run --data-dir "$DATA" --quiet --out "$R/$name" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "[$SECONDS s] $name: exit $rc: $(tail -1 "$R/$name.log")"
  if [ "$rc" -ne 0 ] && [ -f "$R/$name/checkpoint.pt" ]; then
    timeout 60 python3 -m ffpipe eval --checkpoint "$R/$name" --device "$DEV" > "$R/$name/test-eval.json" 2>> "$R/$name.log"
    echo "[$SECONDS s] $name: stopped run, test eval: $(head -c 200 "$R/$name/test-eval.json")"
  fi
  pack
}

sampler=
[ "$DRY" = 1 ] || (while sleep 15; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader \
  | sed "s/^/$SECONDS s, /" >> "$R/gpu-util.csv"; done) > /dev/null 2>&1 &  # holds no pipe of the caller open
[ "$DRY" = 1 ] || sampler=$!
# ---- phase A: the benchmark, alone on the GPU (data decoding on the CPU meanwhile)
python3 -c "
from ffpipe import data
for name in ('mnist', 'cifar10', 'fer2013'):
    print(name, len(data.load(name, '$DATA', download=False).train))" > "$R/decode.log" 2>&1 &
decode=$!
if [ "$DRY" = 1 ]; then bench_args=(--batch-size 64 --steps 12 --timeout 60); W=64
else bench_args=(--batch-size 1024 --steps 60 --timeout 45); W=4096; fi
echo "[$SECONDS s] bench: start"
timeout -k 10 200 python3 -m ffpipe bench --synthetic --devices "$DEV" "${bench_args[@]}" --layers $W,$W,$W,$W --stages 1,2,4 \
  --variants ff-inprocess,ff-pipeline,bp-inprocess --out "$R/bench" > "$R/bench.log" 2>&1
echo "[$SECONDS s] bench: exit $?"; cat "$R/bench/bench.md" 2>/dev/null | head -30
wait $decode; cat "$R/decode.log"
# a NaN batch refused on the GPU without a host sync before the step (the path the CPU tests run with CPU kernels)
timeout 60 python3 scripts/gpu_finite_check.py --device "$DEV" $([ "$DRY" = 1 ] && echo --as-gpu) 2>&1 | tee "$R/finite-check.log"
pack

# ---- phase B: every accuracy run side by side. The first GPU session (results/gpu-h200) ran the conv recipes on
# MNIST and FER2013 and a wider CIFAR-10 net with shifts; what it left undone comes first here.
if [ "$DRY" = 1 ]; then TS=(--train-size 2000 --val-size 500); SEEDEP=(--epochs 3); CA=conv10k3p2,conv20k3p2,conv40k3p2
  LC=lc10k3p2,lc20k3p2,lc40k3p2  # the competitive loss needs a channel per class
else TS=(); SEEDEP=(); CA=conv100k3p2,conv200k3p2,conv400k3p2; LC=lc32k3p2,lc64k3p2,lc128k3p2; fi
ep() { [ "$DRY" = 1 ] && echo 1 || echo "$1"; }  # epochs (1 in a dry run)
conv=(--standardize --loss competitive --optimizer adam --lr 1e-3 --peer-norm 0 --score-last)
job check-pipeline 170 --preset hinton --dataset mnist --epochs "$(ep 10)" --eval-every 2 --devices "$DEV" "${TS[@]}" &
check=$!; pids=($check)
for d in mnist fer2013 cifar10; do  # the seed report's recipe, each run on its own (one full batch per epoch)
  sleep 2
  blur=(); [ "$d" = fer2013 ] && blur=(--test-blur 3)  # this copy's training images are blurred (docs/results.md)
  job "seed-$d" 400 --inprocess --preset seed --dataset "$d" --device "$DEV" --threads 1 "${SEEDEP[@]}" "${blur[@]}" &
  pids+=($!)
done
sleep 2
job cifar-a 400 --dataset cifar10 --val-size 5000 --flip "${conv[@]}" --layers $CA \
  --batch-size 256 --epochs "$(ep 35)" --eval-every 5 --devices "$DEV" "${TS[@]}" &
pids+=($!)
sleep 2  # the CPU run's recipe (results/cifar10-lc-zca-30: whitened inputs, a 2000 top, its readout), longer
job cifar-lc 400 --dataset cifar10 --val-size 5000 --flip --whiten 1 "${conv[@]}" --layers $LC,2000 \
  --predict readout --readout-optimizer adam --readout-lr 1e-3 \
  --batch-size 100 --epochs "$(ep 20)" --eval-every 4 --devices "$DEV" "${TS[@]}" &
pids+=($!)
wait $check  # the pipelined check first, then the same recipe in-process, alone of its kind
job check-inprocess 150 --preset hinton --dataset mnist --epochs "$(ep 10)" --eval-every 2 --inprocess --device "$DEV" --threads 1 "${TS[@]}"
wait "${pids[@]}"
[ -z "$sampler" ] || kill "$sampler" 2>/dev/null
python3 - "$R" <<'PY' | tee "$R/table.txt"
import json, sys, pathlib
for s in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    d, ev = json.loads(s.read_text()), s.parent / "test-eval.json"
    acc = d.get("test_accuracy")
    if acc is None and ev.is_file() and ev.stat().st_size:
        acc = json.loads(ev.read_text())["accuracy"]
    print(f"{s.parent.name}: {d.get('mode')} test {acc} val {d.get('val_accuracy')} epochs {d.get('epochs')} "
          f"interrupted {d.get('interrupted')} wall {d.get('wall_s')} samples/s {d.get('train_samples_per_s')}")
PY
pack
ls -la "$OUT"
