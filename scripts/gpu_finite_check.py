"""On a GPU: a layer's update refuses a batch whose loss is not finite without changing anything, through the path
the CPU tests can only run with the CPU's kernels (the fused optimizer skipping the step on the device, the loss read
after it; `ffpipe.layer.step_if_finite`). Prints one line per case and exits 1 if any fails.

    python scripts/gpu_finite_check.py --device cuda
    python scripts/gpu_finite_check.py --device cpu --as-gpu   # the same path on the CPU (what the tests do)
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from ffpipe import layer as layer_module
from ffpipe.config import LayerConfig, OptimConfig
from ffpipe.layer import NonFiniteLoss, build_layer, local_update, make_optimizer, skipped_steps


def case(spec, shape, loss: str, optim: str, device: str) -> str:
    torch.manual_seed(0)
    layer = build_layer(1, spec, shape, LayerConfig(loss=loss, peer_norm=0.03), seed=0, num_classes=4).to(device)
    opt = make_optimizer(layer.parameters(), OptimConfig(name=optim, lr=1e-2))
    d = 1
    for s in shape:
        d *= s
    x_pos, x_neg = torch.rand(8, d, device=device), torch.rand(8, d, device=device)
    y = torch.arange(8, device=device) % 4
    neg = None if loss == "competitive" else x_neg
    for _ in range(2):  # SGD's momentum buffers exist from here on: its later steps are skipped on the device too
        local_update(layer, opt, x_pos, neg, y)
    weights, state = copy.deepcopy(layer.state_dict()), copy.deepcopy(opt.state_dict())
    bad = x_pos.clone()
    bad[3, d // 2] = float("nan")
    try:
        local_update(layer, opt, bad, neg, y)
        return "FAILED: the NaN batch was not refused"
    except NonFiniteLoss:
        pass
    if getattr(opt, "found_inf", None) is None:
        return "FAILED: the loss was read before the step (not the device path)"
    same = all(torch.equal(layer.state_dict()[k], v) for k, v in weights.items())
    for p, s in state["state"].items():
        for k, v in s.items():
            same &= torch.equal(opt.state_dict()["state"][p][k], v)
    if not same:
        return "FAILED: the refused batch changed the weights or the optimizer's state"
    local_update(layer, opt, x_pos, neg, y)
    if not all(torch.isfinite(v).all() for v in layer.state_dict().values()):
        return "FAILED: not finite after the next step"
    return "ok"


def counted(device: str) -> str:
    """The in-process trainer's way (`read_after=False`): steps skipped on the device are only counted there, with no
    host sync in a step (on a GPU, torch's sync debug mode raises on one), and read afterwards by `skipped_steps`."""
    torch.manual_seed(0)
    layer = build_layer(1, 64, (32,), LayerConfig(peer_norm=0.03), seed=0, num_classes=4).to(device)
    opt = make_optimizer(layer.parameters(), OptimConfig(name="adam", lr=1e-2))
    x_pos, x_neg = torch.rand(8, 32, device=device), torch.rand(8, 32, device=device)
    bad = x_pos.clone()
    bad[2, 5] = float("nan")
    local_update(layer, opt, x_pos, x_neg)
    weights = copy.deepcopy(layer.state_dict())
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            local_update(layer, opt, bad, x_neg, read_after=False)
    except NonFiniteLoss:
        return "FAILED: the loss was read before the step (not the device path)"
    except RuntimeError as e:
        return f"FAILED: a host sync in a step ({e})"
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    n = skipped_steps(opt)
    if n != 3:
        return f"FAILED: {n} skipped steps counted, not 3"
    if not all(torch.equal(layer.state_dict()[k], v) for k, v in weights.items()):
        return "FAILED: a skipped step changed the weights"
    return "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--as-gpu", action="store_true", help="take the GPU's path on any device (for a check on the CPU)")
    args = ap.parse_args()
    if args.as_gpu:
        layer_module.READ_LOSS_FIRST = ()
    failed = 0
    for spec, shape, loss, optim in [(64, (32,), "threshold", "adam"), (64, (32,), "threshold", "sgd"),
                                     ("conv8k3p2", (3, 8, 8), "competitive", "adam"), ("lc8k3p2", (3, 8, 8), "symba", "adam")]:
        result = case(spec, shape, loss, optim, args.device)
        failed += result != "ok"
        print(f"finite check on {args.device}: {spec} {loss} {optim}: {result}", flush=True)
    result = counted(args.device)
    failed += result != "ok"
    print(f"finite check on {args.device}: steps skipped and counted on the device (in-process): {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
