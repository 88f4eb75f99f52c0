#!/usr/bin/env bash
# The prepared GPU benchmark (bench issue): `ffpipe bench` on one lent GPU, every stage on the same card, at
# 1, 2 and 4 stages, with layers wide enough (4096) that compute, not Python or the wire, dominates. About
# 4 minutes on an H100; writes bench.json, bench.md and the plots under $OUT.
#
# Prepare here, once (the folder is git-ignored and travels with `carry`):
#   mkdir -p .whl && cp ../shared/wheels/pyzmq-*.whl .whl/
# Then, with the device tool: run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=420)
set -euo pipefail
OUT="${OUT:-results/bench-gpu}"
source scripts/gpu_env.sh
timeout 380 python3 -m ffpipe bench --synthetic --devices cuda --layers 4096,4096,4096,4096 --batch-size 1024 \
  --steps 100 --stages 1,2 --microbatches 4 --timeout 90 --out "$OUT" || echo "bench exited with $?"
cat "$OUT/bench.md"
