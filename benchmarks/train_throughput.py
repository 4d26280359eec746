#!/usr/bin/env python
"""Pre-training throughput of one SSL method through `attnssl.train.Trainer`, beside a supervised baseline.

For each backbone width (ResNet-18 with the small-image stem, 32 px by default) this script measures, in the
same process and on the same images:

  (a) the method (SimCLR by default): `Trainer.fit` with two-crop views, everything a real run does
      (on-device augmentation of both views, forward and backward through backbone and projector, loss,
      online probe, optimiser step); images per second of the last epoch (the first one warms up);
  (b) the baseline: a plain supervised step on the same backbone (one un-augmented view, a linear head,
      cross-entropy, the same optimiser and batch size), images per second over the same number of images
      after one warm-up pass.

The ratio (a)/(b) is the price of the second view, the augmentation and the SSL head. Example:

    python benchmarks/train_throughput.py --widths 8 16 --threads 2
    python benchmarks/train_throughput.py --method byol --widths 16 64 --device cuda --batch-size 256
"""
from __future__ import annotations
import argparse, statistics, sys, time

import torch
from torch import nn

from attnssl.augment import Normalize
from attnssl.core import git_commit, hardware_info
from attnssl.methods import build_method
from attnssl.models import build_backbone
from attnssl.synthetic import ClutterShapes
from attnssl.train import Trainer, TrainConfig
from attnssl.views import build_views


def samples_per_s(one_pass, n: int, device: torch.device, epochs: int) -> float:
    "n / the median time of `one_pass` over epochs 2.. (the first is a warm-up), the device synchronised."
    one_pass(); sync(device)
    times = []
    for _ in range(max(1, epochs - 1)):
        t0 = time.perf_counter(); one_pass(); sync(device); times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def sync(device: torch.device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def method_throughput(method: str, width: int, ds, a, device) -> float:
    "Images/s of the last of `a.epochs` epochs of `Trainer.fit` (the first warms up)."
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", width=width, stem="small")
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, optimizer="adamw", lr=2e-3, weight_decay=1e-6,
                      device=str(device), progress=False)
    extra = {"num_samples": len(ds)} if method == "memory_bank" else {}   # the bank holds one row per image
    return Trainer(build_method(method, backbone, **extra), build_views("two_crop", ds), ds, cfg).fit()["samples_per_s"]


def supervised_throughput(width: int, ds, a, device) -> float:
    "Images/s of a plain supervised step (median of `a.epochs - 1` timed passes after one warm-up pass)."
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", width=width, stem="small").to(device)
    head = nn.Linear(backbone.out_dim, int(ds.labels.max()) + 1).to(device)
    opt = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=2e-3, weight_decay=1e-6)
    norm = Normalize(tuple(ds.mean), tuple(ds.std))
    x_all, y_all = ds.images.to(device), torch.as_tensor(ds.labels).to(device)
    n = len(ds) // a.batch_size * a.batch_size                  # drop_last, like training

    def one_pass():
        for s in range(0, n, a.batch_size):
            x = norm(x_all[s:s + a.batch_size].float() / 255)
            loss = nn.functional.cross_entropy(head(backbone(x)), y_all[s:s + a.batch_size])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

    backbone.train()
    return samples_per_s(one_pass, n, device, a.epochs)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="simclr", help="any name `attnssl.methods.build_method` takes that uses two views")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="ResNet-18 base widths (64 = standard)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--images", type=int, default=1024, help="images per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help=">= 2: the first epoch is a warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    a = p.parse_args(argv)
    if a.epochs < 2: p.error("--epochs must be >= 2: the first epoch warms up and is not timed")
    if a.images < a.batch_size: p.error(f"--images ({a.images}) must be at least --batch-size ({a.batch_size})")
    if a.method == "dino": p.error("DINO takes multi-crop views; time it with benchmarks/short_run_knn.py")
    return a


def main(argv=None) -> list[dict]:
    a = parse(argv)
    if a.threads: torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    ds = ClutterShapes("train", num_images=a.images, image_size=a.size)
    print(f"commit {git_commit()} | {hardware_info()} | {torch.get_num_threads()} thread(s) | {a.images} images of {a.size} px, "
          f"batch {a.batch_size}, {a.epochs} epochs (first one warms up)")
    print(f"{'backbone':<28} {a.method + ' img/s':>14} {'supervised img/s':>17} {'ratio':>6}")
    rows = []
    for w in a.widths:
        ssl = method_throughput(a.method, w, ds, a, device)
        sup = supervised_throughput(w, ds, a, device)
        rows.append({"width": w, "method": a.method, "method_per_s": ssl, "supervised_per_s": sup})
        print(f"{f'resnet18 width {w}, small stem':<28} {ssl:>14.1f} {sup:>17.1f} {ssl / sup:>6.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
