#!/usr/bin/env bash
# The prepared GPU results run (results issue), for one lent GPU; about 6 minutes on an H100, writes under $OUT:
#   seed-{mnist,cifar10,fer2013}/  the seed report's own recipe (`seed` preset: full batch, 1000/3000/1000
#                                  epochs per layer, in-process: it trains one layer after another)
#   cifar10-conv/                  convolutional FF with the competitive loss, pipelined, every stage on the GPU
# Prepare here, once (both folders are git-ignored and travel with `carry`, about 52 MB):
#   mkdir -p .whl .gpu-data/MNIST/raw && cp ../shared/wheels/pyzmq-*.whl .whl/
#   cp ../shared/data/MNIST/raw/*.gz .gpu-data/MNIST/raw/ && cp ../shared/data/*-jpg.tar.gz .gpu-data/
# Then, with the device tool: run(command="bash scripts/gpu_results.sh", carry=[".whl", ".gpu-data"], timeout_s=560)
set -uo pipefail
OUT="${OUT:-results/gpu}"
source scripts/gpu_env.sh
export FFPIPE_CACHE=/tmp/ffpipe-cache
run() { local limit=$1; shift; timeout "$limit" python3 -m ffpipe run --data-dir .gpu-data --quiet "$@" 2>&1 | tail -2 || echo "exit $?"; }
run 60 --inprocess --preset seed --dataset mnist --device cuda --out "$OUT/seed-mnist"
run 120 --inprocess --preset seed --dataset cifar10 --device cuda --out "$OUT/seed-cifar10"
run 60 --inprocess --preset seed --dataset fer2013 --device cuda --out "$OUT/seed-fer2013"
run 240 --dataset cifar10 --devices cuda --val-size 5000 --standardize --flip --loss competitive --optimizer adam \
  --lr 1e-3 --peer-norm 0 --no-skip-first --layers conv96k3p2,conv192k3p2,conv384k3p2 --batch-size 256 --epochs 20 \
  --eval-every 5 --out "$OUT/cifar10-conv"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for s in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    d = json.loads(s.read_text())
    print(f"{s.parent.name}: {d['mode']} test {d['test_accuracy']:.4f} epochs {d['epochs']} wall {d['wall_s']:.0f}s")
PY
