"""Time one local update (forward, loss, backward, optimizer step) of each FF layer of a net, one thread, random
inputs of the right shapes: milliseconds per step and layer, the median of --rounds. With --against DIR (another
checkout of ffpipe, e.g. `git worktree add /tmp/old <rev>`), the two trees run alternately, one process per round
each, so machine drift hits both alike, and the table gives their ratio.

    python scripts/time_layer_steps.py --layers lc32k3p2,lc64k3p2,lc128k3p2 --shape 3,32,32 --against /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def measure(a: argparse.Namespace) -> list[float]:
    import dataclasses
    import time

    import torch

    from ffpipe.config import preset
    from ffpipe.layer import build_layer, local_update, make_optimizer, plan

    torch.set_num_threads(1)
    cfg = preset("quick", layers=a.layers.split(","))
    cfg = dataclasses.replace(cfg, layer=dataclasses.replace(cfg.layer, loss="competitive", peer_norm=0.0, goodness="sum", threshold=1.0),
                              optim=dataclasses.replace(cfg.optim, name="adam", lr=1e-3, weight_decay=3e-4))
    shape = tuple(int(n) for n in a.shape.split(","))
    times = []
    for i, (spec, in_shape, _) in enumerate(plan(cfg.layers, shape)):
        layer = build_layer(i, spec, in_shape, cfg.layer, seed=0, num_classes=a.classes)
        opt = make_optimizer(layer.parameters(), cfg.optim)
        x, y = torch.randn(a.batch_size, *in_shape).flatten(1), torch.randint(0, a.classes, (a.batch_size,))
        for _ in range(3):  # warm-up: allocator, optimizer state
            local_update(layer, opt, x, None, y)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            local_update(layer, opt, x, None, y)
        times.append((time.perf_counter() - t0) / a.steps * 1e3)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", required=True, help="as `ffpipe run --layers`")
    p.add_argument("--shape", required=True, help="input C,H,W (or a width), e.g. 3,32,32")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--against", type=Path, help="another ffpipe checkout to time alternately with this one")
    p.add_argument("--once", action="store_true", help=argparse.SUPPRESS)  # one measurement, JSON on stdout
    a = p.parse_args()
    if a.once:
        print(json.dumps(measure(a)))
        return
    here = Path(__file__).resolve().parents[1]
    trees = [here] + ([a.against.resolve()] if a.against else [])
    args = [arg for arg in sys.argv[1:] if arg != "--once"]
    results: dict[Path, list[list[float]]] = {t: [] for t in trees}
    for r in range(a.rounds):
        for tree in trees:
            run = subprocess.run([sys.executable, __file__, *args, "--once"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
            if run.returncode:
                sys.exit(f"{tree}: " + (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1])
            results[tree].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {tree}: " + " ".join(f"{t:.1f}" for t in results[tree][-1]) + " ms", flush=True)
    med = {t: [statistics.median(col) for col in zip(*rs, strict=True)] for t, rs in results.items()}
    print("\n| layer | " + " | ".join(f"{t} ms" for t in trees) + (" | ratio |" if a.against else " |"))
    print("|---" * (len(trees) + 1 + bool(a.against)) + "|")
    for i, spec in enumerate(a.layers.split(",")):
        cells = [f"{med[t][i]:.1f}" for t in trees]
        ratio = [f"{med[trees[1]][i] / med[here][i]:.2f}"] if a.against else []
        print(f"| {i} {spec} | " + " | ".join(cells + ratio) + " |")
    total = [sum(med[t]) for t in trees]
    print("| all | " + " | ".join(f"{s:.1f}" for s in total) + (f" | {total[1] / total[0]:.2f} |" if a.against else " |"))
    if a.against:
        print(f"\nratio: {trees[1]} ÷ {here}, medians of {a.rounds} alternating rounds; per round:")
        for r in range(a.rounds):
            print(f"  round {r + 1}: all layers {sum(results[trees[1]][r]) / sum(results[here][r]):.2f}")


if __name__ == "__main__":
    main()
