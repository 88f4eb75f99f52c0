"""Accuracy against training time (or epoch) from run folders' summary.json: one PNG.

    python scripts/plot_history.py results/mnist-hinton results/fashion-hinton --out results/accuracy.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--x", choices=("epoch", "time"), default="epoch")
    p.add_argument("--out", type=Path, default=Path("accuracy.png"))
    a = p.parse_args()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for run in a.runs:
        s = json.loads((run / "summary.json").read_text())
        h = s["history"]
        xs = [r["epoch"] if a.x == "epoch" else r.get("train_s", r["wall_s"]) / 60 for r in h]
        loss = s.get("config", {}).get("layer", {}).get("loss", "")
        recipe = s["preset"] if s["preset"] in ("hinton", "seed") else f"{loss} loss"
        recipe += ", equalized" if s.get("config", {}).get("equalize") else ""
        recipe += f", shift {s['config']['shift']}" if s.get("config", {}).get("shift") else ""
        recipe += ", flip" if s.get("config", {}).get("flip") else ""
        recipe += f", ZCA {s['config']['whiten']:g}" if s.get("config", {}).get("whiten") else ""
        recipe += f", {s['config']['val_size']:,} held out" if s.get("config", {}).get("val_size") else ""
        where = "GPU" if "cuda" in json.dumps(s.get("devices") or s.get("device") or "") else "CPU"
        batch = s.get("config", {}).get("batch_size")
        label = (f"{s['dataset']} {recipe}, {s['mode']} on {where} ({','.join(map(str, s['layers']))}), "
                 f"{f'batch {batch}, ' if batch else ''}{s['epochs']} epochs [{h[-1].get('split', 'test')}]")
        ax.plot(xs, [100 * r["accuracy"] for r in h], marker=".", label=label)
    ax.set_xlabel("epoch" if a.x == "epoch" else "training minutes")
    ax.set_ylabel("accuracy (%) on the split in brackets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
