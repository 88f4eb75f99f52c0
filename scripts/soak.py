"""Soak: a long pipelined run under chaos, with figures for README's Reliability table.

    python scripts/soak.py --minutes 30 --out results/soak -- --dataset mnist --data-dir ../shared/data

Starts `ffpipe run --restart on-failure` (extra arguments after `--` go to it), then, every `--every` seconds
(jittered, from a seeded RNG), does one of: kill -9 a random role (source, a layer, the sink); SIGSTOP a
random layer for 5-15 s; push a burst of malformed messages into layer 0 and the sink. It samples every
process's RSS every 5 s. At the deadline it sends SIGTERM to the launcher and times the shutdown. Writes
soak.json and soak.md in --out (the run folder is --out/run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import zmq

ROGUE = [  # each is a multipart message no ffpipe role may accept
    [b"\x00garbage"],
    [msgpack.packb({"v": 9, "kind": "train", "seq": 0, "epoch": 0, "scalars": {}, "tensors": []})],
    [msgpack.packb({"v": 1, "kind": "exec", "seq": 0, "epoch": 0, "scalars": {}, "tensors": []})],
    [msgpack.packb({"v": 1, "kind": "train", "seq": 0, "epoch": 0, "scalars": {}, "tensors": [["x_pos", "float32", [4, 4]]]}), b"\x00" * 10],
    [msgpack.packb({"v": 1, "kind": "train", "seq": 0, "epoch": 0, "scalars": {}, "tensors": [["x_pos", "complex64", [1]]]}), b"\x00" * 8],
    [msgpack.packb({"v": 1, "kind": "eval", "seq": 0, "epoch": 0, "scalars": {}, "tensors": [["x", "float32", [2**30, 2**30]]]}), b""],
    [msgpack.packb({"v": 1, "kind": "train", "seq": 0, "epoch": 0, "scalars": {}, "tensors": [["x_pos", "float32", [1]]]}), b"\x00\x00\xc0\x7f"],  # NaN
]


def rss_mb(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def processes(run: Path) -> dict[str, int]:
    try:
        info = json.loads((run / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {p["role"] if p["index"] is None else f"layer {p['index']}": p["pid"] for p in info["processes"]}


def endpoints(run: Path) -> list[str]:
    topo = json.loads((run / "run.json").read_text())["topology"]
    return [f"tcp://{topo['layers'][0]}", f"tcp://{topo['sink']}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--every", type=float, default=60, help="seconds between chaos events (jittered)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/soak"))
    ap.add_argument("run_args", nargs="*", help="arguments for ffpipe run, after --")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    run = args.out / "run"
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ffpipe", "run", "--restart", "on-failure", "--max-restarts", "1000", "--quiet",
           "--out", str(run), *args.run_args]
    log = open(args.out / "soak.log", "w")
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    events: list[dict] = []
    samples: list[dict] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5):
            now = round(time.monotonic() - t0, 1)
            samples.append({"t": now, **{role: rss_mb(pid) for role, pid in processes(run).items()}})

    while not (run / "layer0.pt").is_file():  # training has started
        if launcher.poll() is not None:
            sys.exit(f"soak: the run ended early ({launcher.returncode}); see {args.out / 'soak.log'}")
        time.sleep(0.5)
    threading.Thread(target=sample, daemon=True).start()
    ctx = zmq.Context()
    deadline = t0 + args.minutes * 60
    malformed = 0
    while time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(min(max(0.0, deadline - time.monotonic()), args.every * rng.uniform(0.5, 1.5)))
        if time.monotonic() >= deadline or launcher.poll() is not None:
            break
        roles = processes(run)
        what = rng.choice(["kill", "kill", "stop", "malformed"])
        now = round(time.monotonic() - t0, 1)
        if what == "kill":
            role = rng.choice(sorted(roles))
            try:
                os.kill(roles[role], signal.SIGKILL)
            except ProcessLookupError:
                continue
            events.append({"t": now, "event": "kill -9", "role": role})
        elif what == "stop":
            role = rng.choice([r for r in roles if r.startswith("layer")])
            pause = rng.uniform(5, 15)
            os.kill(roles[role], signal.SIGSTOP)
            time.sleep(pause)
            os.kill(roles[role], signal.SIGCONT)
            events.append({"t": now, "event": "SIGSTOP", "role": role, "seconds": round(pause, 1)})
        else:
            for url in endpoints(run):
                sock = ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 2000)
                sock.connect(url)
                for k in range(50):
                    sock.send_multipart(ROGUE[k % len(ROGUE)])
                sock.close()
                malformed += 50
            events.append({"t": now, "event": "malformed", "messages": 100})
        print(f"soak {now:>7.1f}s: {events[-1]}", flush=True)
    ctx.term()
    stop_t = time.monotonic()
    if launcher.poll() is None:
        os.kill(launcher.pid, signal.SIGTERM)
    rc = launcher.wait(timeout=120)
    shutdown_s = time.monotonic() - stop_t
    done.set()
    log.close()
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    a = summary.get("accounting", {})
    roles = sorted({k for s in samples for k in s if k != "t"})
    third = max(1, len(samples) // 3)

    def peak(part: list[dict], role: str) -> float | None:
        values = [s[role] for s in part if s.get(role)]
        return round(max(values), 1) if values else None

    memory = {r: {"first_third_peak_mb": peak(samples[:third], r), "last_third_peak_mb": peak(samples[-third:], r)} for r in roles}
    kills: dict[str, int] = {}
    for e in events:
        if e["event"] == "kill -9":
            kills[e["role"]] = kills.get(e["role"], 0) + 1
    result = {
        "command": " ".join(cmd), "minutes": round((stop_t - t0) / 60, 1), "launcher_exit": rc, "shutdown_s": round(shutdown_s, 2),
        "events": events, "kills": kills, "restarts": summary.get("restarts") or json.loads((run / "run.json").read_text()).get("restarts"),
        "malformed_sent": malformed, "rejected_counted": a.get("rejected"),
        "sent_train": a.get("sent_train"), "received_train": a.get("received_train"), "applied": a.get("applied"),
        "lost": a.get("lost"), "applied_twice": a.get("applied_twice"), "resent": a.get("resent"),
        "complete": a.get("complete"), "test_accuracy": summary.get("test_accuracy"), "history": summary.get("history"),
        "memory": memory, "samples": samples,
    }
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Soak: {result['minutes']} min, `{result['command']}`", "",
             f"- chaos events: {len(events)} ({sum(kills.values())} kill -9: {kills}; "
             f"{sum(e['event'] == 'SIGSTOP' for e in events)} SIGSTOP; {malformed} malformed messages)",
             f"- restarts: {result['restarts']}; launcher exit after SIGTERM: {rc} in {result['shutdown_s']} s",
             f"- train batches sent {result['sent_train']}, received {result['received_train']}, applied per layer {result['applied']}; "
             f"lost {result['lost']}; applied twice {result['applied_twice']}; resent {result['resent']}; complete {result['complete']}",
             f"- rejected (counted by the processes alive at the end): {result['rejected_counted']}",
             "", "| process | peak RSS, first third (MB) | peak RSS, last third (MB) |", "|---|---|---|",
             *[f"| {r} | {m['first_third_peak_mb']} | {m['last_third_peak_mb']} |" for r, m in memory.items()]]
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
