"""Are a dataset's training images blurrier than its test images? Label-free: image statistics only.

    python scripts/blur_check.py fer2013 ../shared/data            # training images blurred with sigma about 3
    python scripts/blur_check.py fer2013 ../shared/data --sigma 3  # and what is left after --test-blur 3
    python scripts/blur_check.py cifar10 ../shared/data

Prints, for up to 4,000 training images (a fixed random sample) and every test image: the per-image pixel std,
the share of images that reach a pixel <= 5 and >= 250, the mean absolute Laplacian (local contrast, a
sharpness measure) at the 5th, 50th and 95th percentile, and `ffpipe.data.blur_sigma`: the sigma of the
Gaussian blur that best turns the test images' average power spectrum into the training images'. With
--sigma, the same for the test images blurred as `ffpipe run --test-blur SIGMA` blurs them.
"""

import argparse

import torch

from ffpipe.data import blur, blur_sigma, load


def laplacian(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute 4-neighbour Laplacian per image. (N, C, H, W) uint8 -> (N,)"""
    x = x.float()
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.abs().mean(dim=(1, 2, 3))


def describe(name: str, x: torch.Tensor) -> None:
    lap = laplacian(x)
    q = torch.quantile(lap, torch.tensor([0.05, 0.5, 0.95]))
    print(f"{name:>22}: {len(x):>6} images, pixel std {x.float().std(dim=(1, 2, 3)).mean():5.1f}, "
          f"min <= 5 {(x.amin(dim=(1, 2, 3)) <= 5).float().mean():4.0%}, max >= 250 {(x.amax(dim=(1, 2, 3)) >= 250).float().mean():4.0%}, "
          f"|Laplacian| p5/p50/p95 {q[0]:5.2f} {q[1]:5.2f} {q[2]:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("data_dir")
    ap.add_argument("--sigma", type=float, default=0.0, help="also check the test images blurred with this sigma")
    args = ap.parse_args()
    data = load(args.dataset, args.data_dir, download=False)
    sample = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:4000]
    train, test = data.train.x[sample], data.test.x
    describe("train", train)
    describe("test", test)
    print(f"training images against test images: as if blurred with sigma {blur_sigma(train, test):.2f} px")
    if args.sigma:
        blurred = blur(test, args.sigma)
        describe(f"test, blurred {args.sigma:g}", blurred)
        print(f"training images against the blurred test images: sigma {blur_sigma(train, blurred):.2f} px "
              f"(and the blurred test images against the training images: {blur_sigma(blurred, train):.2f} px)")


if __name__ == "__main__":
    main()
