"""Pipelined vs in-process FF throughput on this machine, in one invocation (a benchmark, not a test).

For each depth L it runs, on the same data, layer widths and batch size:
  - in-process with 1 torch thread  (the single-thread reference)
  - in-process with all cores        (what one process can do with the whole machine)
  - the pipeline, one process per layer, 1 thread each
and reports pipelined samples/s / (busy cores x single-thread in-process samples/s), where busy cores is
min(L, cores): the pipeline's efficiency. Training throughput counts each image once; evaluation is excluded.

    python scripts/pipeline_efficiency.py --data-dir ../shared/data --out results/pipeline-efficiency
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "ffpipe", "run", *args, "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--depths", default="2,4")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--negatives", default="random", help="random: no readout pass (pure FF work); hard: with it")
    p.add_argument("--out", default="results/pipeline-efficiency")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    out = Path(a.out)
    rows = []
    for depth in [int(d) for d in a.depths.split(",")]:
        layers = ",".join([str(a.width)] * depth)
        common = ["--dataset", a.dataset, "--data-dir", a.data_dir, "--layers", layers, "--batch-size", str(a.batch_size),
                  "--epochs", str(a.epochs), "--eval-every", "0", "--negatives", a.negatives, "--preset", "hinton"]
        single = run([*common, "--inprocess", "--threads", "1"], out / f"L{depth}-inprocess-1t")
        whole = run([*common, "--inprocess", "--threads", str(cores)], out / f"L{depth}-inprocess-{cores}t")
        pipe = run([*common, "--threads", "1"], out / f"L{depth}-pipeline")
        busy = min(depth, cores)
        rows.append({
            "layers": layers, "batch_size": a.batch_size, "cores": cores,
            "inprocess_1thread_samples_per_s": round(single["train_samples_per_s"], 1),
            f"inprocess_{cores}threads_samples_per_s": round(whole["train_samples_per_s"], 1),
            "pipeline_samples_per_s": round(pipe["train_samples_per_s"], 1),
            "pipeline_efficiency": round(pipe["train_samples_per_s"] / (busy * single["train_samples_per_s"]), 3),
            "pipeline_vs_inprocess_all_cores": round(pipe["train_samples_per_s"] / whole["train_samples_per_s"], 3),
            "pipeline_peak_rss_mb": pipe["peak_rss_mb"],
            "pipeline_busy_s": pipe["busy_s"], "pipeline_train_s": round(pipe["train_s"], 2),
            "accuracy": {"inprocess_1thread": single["test_accuracy"], "pipeline": pipe["test_accuracy"]},
        })
        print(json.dumps(rows[-1]), flush=True)
    (out / "efficiency.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| layers | in-process 1 thread | in-process %d threads | pipeline (1 thread/layer) | efficiency | pipeline / in-process %d threads |" % (cores, cores),
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['inprocess_1thread_samples_per_s']:,.0f} | {r[f'inprocess_{cores}threads_samples_per_s']:,.0f} | "
                     f"{r['pipeline_samples_per_s']:,.0f} | {r['pipeline_efficiency']:.2f} | {r['pipeline_vs_inprocess_all_cores']:.2f} |")
    (out / "efficiency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
