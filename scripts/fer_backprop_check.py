"""A backprop CNN on the same FER2013 copy as ffpipe: is the validation/test gap the data's or FF's?

    python scripts/fer_backprop_check.py raw 8        # inputs scaled to about [-2, 2]
    python scripts/fer_backprop_check.py perimage 6   # each image standardized to zero mean, unit std
    python scripts/fer_backprop_check.py raw 6 ../shared/data 3   # also score the test images blurred (sigma 3)

Trains a small CNN (3 conv blocks of 32/64/128 channels, dropout, a 256-unit hidden layer; Adam, batch 128,
random horizontal flips, one torch thread) on the training images less the same 3,000-image hold-out that
`ffpipe run --dataset fer2013 --val-size 3000` uses, and prints validation and test accuracy after every
epoch. Reads the data through ffpipe's loader, so both see the same images and labels. With a blur sigma, also
the test images blurred as `ffpipe run --test-blur` blurs them (this copy's training images are blurred, its
test images are not: `python scripts/blur_check.py`).
"""

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ffpipe.data import blur, hold_out, load

torch.set_num_threads(1)
torch.manual_seed(0)
mode = sys.argv[1]  # raw | perimage
epochs = int(sys.argv[2])
data_dir = sys.argv[3] if len(sys.argv) > 3 else "../shared/data"
sigma = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
d = hold_out(load("fer2013", data_dir, download=False), 3000)


def prep(x):
    x = x.float().div(255)
    if mode == "perimage":
        x = (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-3)
    else:
        x = (x - 0.5) / 0.25
    return x


xtr, ytr = prep(d.train.x), d.train.y
sets = {"val": (prep(d.val.x), d.val.y), "test": (prep(d.test.x), d.test.y)}
if sigma:
    sets[f"test blurred {sigma:g}"] = (prep(blur(d.test.x, sigma)), d.test.y)
net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 36, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 7))
opt = torch.optim.Adam(net.parameters(), 1e-3)
t0 = time.time()
for ep in range(epochs):
    net.train()
    perm = torch.randperm(len(ytr))
    for i in range(0, len(perm), 128):
        idx = perm[i:i + 128]
        x = xtr[idx]
        flip = torch.rand(len(idx)) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = F.cross_entropy(net(x), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = {k: (torch.cat([net(x[j:j + 500]).argmax(1) for j in range(0, len(x), 500)]) == y).float().mean().item()
               for k, (x, y) in sets.items()}
    print(mode, "epoch", ep + 1, {k: round(v, 4) for k, v in acc.items()}, f"{time.time() - t0:.0f}s", flush=True)
