"""Backprop baselines for `ffpipe bench`: the FF net's widths as an ordinary MLP plus a linear softmax head.

- `bp-inprocess`: the whole MLP in one process, one optimizer step per mini-batch.
- `bp-gpipe`, `bp-1f1b`: the same MLP cut into one stage per hidden layer (the head rides on the last stage),
  pipelined by torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B, one process per stage (gloo on
  CPU, NCCL on GPU). An optimizer step takes m micro-batches of --batch-size images each, so each stage runs
  the same matrix shapes as the other variants and m micro-batches are in flight, as GPipe intends.

Nothing here is used by FF training; it exists so the benchmark compares against real backprop engines.
"""

from __future__ import annotations

import os
import time
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ffpipe.config import OptimConfig
from ffpipe.layer import make_optimizer

# Adam at 1e-3, the usual robust choice for an MLP on these datasets, built as every FF layer's optimizer is (fused)
OPTIM = OptimConfig(name="adam", lr=1e-3, weight_decay=0.0)


def stages(in_features: int, widths: list[int], classes: int, seed: int) -> list[nn.Sequential]:
    """One Linear+ReLU per hidden layer; the last also holds the linear softmax head."""
    torch.manual_seed(seed)
    dims = [in_features, *widths]
    out = [nn.Sequential(nn.Linear(i, o), nn.ReLU()) for i, o in pairwise(dims)]
    out[-1].append(nn.Linear(widths[-1], classes))
    return out


def mlp(in_features: int, widths: list[int], classes: int, seed: int) -> nn.Sequential:
    return nn.Sequential(*stages(in_features, widths, classes, seed))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


# ---------------------------------------------------------------- pipelined (torch.distributed.pipelining)


def _pp_rank(rank: int, world: int, spec: dict, port: int, out: str) -> None:
    """One pipeline stage process. Rank 0 feeds inputs, the last rank computes the loss; all step their optimizer."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from ffpipe.benchrun import Clock, cpu_s, load_data, sync
    from ffpipe.layer import set_compute
    from ffpipe.metrics import PeakMemory

    from ffpipe.launcher import die_with_launcher

    os.environ["FFPIPE_STAGE_PARENT_PID"] = str(os.getppid())
    die_with_launcher("FFPIPE_STAGE_PARENT_PID")  # never outlive the variant process (a peer would wait in gloo)
    set_compute(spec["threads"])  # the same CPU math as the FF variants
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = spec["device"].startswith("cuda")
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        data, x_all, y_all = load_data(spec, device)
        parts = stages(x_all.shape[1], spec["layers"], data.num_classes, spec["seed"])
        module = parts[rank].to(device)
        opt = make_optimizer(module.parameters(), OPTIM)
        stage = PipelineStage(module, rank, world, device)
        engine = {"bp-gpipe": ScheduleGPipe, "bp-1f1b": Schedule1F1B}[spec["variant"]]
        m, bs = spec["microbatches"], spec["batch_size"]
        schedule = engine(stage, n_microbatches=m, loss_fn=F.cross_entropy)
        step_batch = m * bs
        gen = torch.Generator().manual_seed(spec["seed"])

        def step(idx: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            if world == 1:  # one stage is first and last: it takes the inputs and computes the loss
                schedule.step(x_all[idx], target=y_all[idx], losses=[])
            elif rank == 0:
                schedule.step(x_all[idx])
            elif rank == world - 1:
                schedule.step(target=y_all[idx], losses=[])
            else:
                schedule.step()
            opt.step()

        def batches():
            while True:
                perm = torch.randperm(len(y_all), generator=gen)  # every rank draws the same permutation
                for k in range(len(perm) // step_batch):
                    yield perm[k * step_batch : (k + 1) * step_batch].to(device)

        record: dict = {"rank": rank}
        memory = PeakMemory()  # starts after the first step (see benchrun)
        if spec["to_accuracy"]:
            record.update(_pp_to_accuracy(rank, world, spec, step, batches, module, out, data, x_all, device))
        else:
            steps, warm = spec["steps"], spec["warmup"]
            it = batches()
            for _ in range(warm):
                step(next(it))
                memory.training_starts()
            sync(device)
            dist.barrier()
            clock = Clock()
            for _ in range(steps - warm):
                step(next(it))
            sync(device)
            dist.barrier()
            record.update(clock.stop(samples=(steps - warm) * step_batch))
        record.update(memory.report(), cpu_total_s=cpu_s())
        if cuda:
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        import json

        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _pp_to_accuracy(rank, world, spec, step, batches, module, out, data, x_all, device) -> dict:
    """Epochs until every target is reached (or max_epochs): after each, rank 0 gathers the stages and evaluates."""
    import torch.distributed as dist

    from ffpipe.benchrun import prepare_split

    per_epoch = len(x_all) // (spec["microbatches"] * spec["batch_size"])
    it = batches()
    t0, history, reached = time.perf_counter(), [], {}
    flag = torch.zeros(1, device=device)
    for epoch in range(spec["max_epochs"]):
        for _ in range(per_epoch):
            step(next(it))
        torch.save(module.state_dict(), Path(out, f"stage{rank}.pt"))
        dist.barrier()
        if rank == 0:
            full = nn.Sequential(*stages(x_all.shape[1], spec["layers"], data.num_classes, spec["seed"]))
            for k in range(world):
                full[k].load_state_dict(torch.load(Path(out, f"stage{k}.pt"), weights_only=True))
            xt, yt = prepare_split(data.test, torch.device("cpu"))
            acc = accuracy(full, xt, yt)
            wall = time.perf_counter() - t0
            history.append({"epoch": epoch + 1, "accuracy": acc, "wall_s": round(wall, 2)})
            for target in spec["to_accuracy"]:
                if acc >= target and str(target) not in reached:
                    reached[str(target)] = round(wall, 2)
            flag.fill_(float(len(reached) == len(spec["to_accuracy"])))
        dist.broadcast(flag, 0)
        if flag.item():
            break
    return {"history": history, "time_to_accuracy_s": reached} if rank == 0 else {}


def run_pipelined(spec: dict, out: Path) -> dict:
    """Start one process per stage, wait for all, and merge their records (rank 0 holds the timing)."""
    import json
    import socket

    import torch.multiprocessing as mp

    world = len(spec["layers"])
    with socket.socket() as s:  # a free loopback port for the process-group rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_pp_rank, args=(world, spec, port, str(out)), nprocs=world, join=True)
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {"ranks": ranks}
