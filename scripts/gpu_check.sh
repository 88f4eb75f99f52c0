#!/usr/bin/env bash
# The prepared GPU check (pipeline issue): the hinton preset on MNIST with every layer on the GPU, pipelined and
# in-process, on the lent device machine. Under 5 minutes there; writes summaries under $OUT.
#
# Prepare here, once (both folders are git-ignored and travel with `carry`):
#   mkdir -p .whl .gpu-data/MNIST/raw && cp ../shared/wheels/pyzmq-*.whl .whl/
#   cp ../shared/data/MNIST/raw/*.gz .gpu-data/MNIST/raw/
# Then, with the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu-data"], timeout_s=540)
set -euo pipefail
OUT="${OUT:-results/gpu}"
source scripts/gpu_env.sh
EPOCHS="${EPOCHS:-10}"
common=(--preset hinton --dataset mnist --data-dir .gpu-data --epochs "$EPOCHS" --eval-every 2 --quiet)
timeout 200 python3 -m ffpipe run "${common[@]}" --devices cuda --out "$OUT/pipeline-cuda" 2>&1 | tail -5
timeout 150 python3 -m ffpipe run "${common[@]}" --inprocess --device cuda --out "$OUT/inprocess-cuda" 2>&1 | tail -3
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("pipeline-cuda", "inprocess-cuda"):
    s = json.loads((out / name / "summary.json").read_text())
    print(name, "test_accuracy", round(s["test_accuracy"], 4), "samples/s", round(s["train_samples_per_s"]),
          "wall_s", round(s["wall_s"], 1), "devices", s.get("devices", s.get("device")))
PY
