#!/usr/bin/env python
"""SimCLR pre-training throughput end to end, beside the backbone-only step, per image size and precision variant.

Ready for a GPU (none is available to the project at present); it also runs on a CPU, where CUDA-only
settings (bf16 autocast, channels-last) cannot apply and the output says what actually ran. For each image
size and variant this script measures, in the same process, on the same images and batch size:

  (a) SimCLR through `attnssl.train.Trainer`: on-device augmentation of two views, backbone + projector
      forward and backward, InfoNCE, online probe, optimiser step: images/s of the last epoch (the first one
      warms up, and compiles when `torch.compile` is on);
  (b) the backbone-only step: one un-augmented view through the same backbone with the same precision and
      memory format, a mean-square loss on the features, backward and the same optimiser: images/s after a
      warm-up pass.

The ratio (a)/(b) is what the SSL machinery costs on top of the network. Variants: `fp32`, `bf16` (CUDA
autocast), `bf16-cl` (plus channels-last), `bf16-cl-compile` (plus `torch.compile` of the backbone). Example:

    python benchmarks/gpu_throughput.py --sizes 32 64 96 --width 64 --batch-size 256 --images 8192
    python benchmarks/gpu_throughput.py --sizes 32 --width 2 --images 64 --batch-size 32 --variants fp32 bf16-cl   # CPU check
"""
from __future__ import annotations
import argparse, contextlib, statistics, sys, time
from pathlib import Path

import torch

from attnssl.augment import Normalize
from attnssl.core import git_commit, hardware_info
from attnssl.methods import build_method
from attnssl.models import build_backbone
from attnssl.synthetic import ClutterShapes
from attnssl.train import Trainer, TrainConfig
from attnssl.views import build_views

sys.path.insert(0, str(Path(__file__).resolve().parent))        # the sibling script's timing helpers
from train_throughput import samples_per_s, sync  # noqa: E402

VARIANTS = {   # name -> (precision, channels_last, compile)
    "fp32": ("fp32", False, False), "bf16": ("bf16", False, False),
    "bf16-cl": ("bf16", True, False), "bf16-cl-compile": ("bf16", True, True),
}


def what_ran(variant: str, device: torch.device) -> str:
    "The variant as it actually runs on `device`: bf16 autocast and channels-last apply on CUDA only."
    precision, cl, comp = VARIANTS[variant]
    if device.type != "cuda": precision, cl = "fp32", False
    return "+".join([precision] + (["channels-last"] if cl else []) + (["compile"] if comp else []))


def ssl_throughput(variant: str, ds, a, device) -> float:
    "Images/s of the last of `a.epochs` epochs of SimCLR's `Trainer.fit`."
    precision, cl, comp = VARIANTS[variant]
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", width=a.width, stem=a.stem)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, optimizer="adamw", lr=2e-3, weight_decay=1e-6,
                      precision=precision, channels_last=cl, compile=comp, device=str(device), progress=False)
    return Trainer(build_method("simclr", backbone), build_views("two_crop", ds), ds, cfg).fit()["samples_per_s"]


def backbone_throughput(variant: str, ds, a, device) -> float:
    "Images/s of the backbone-only step (median of `a.epochs - 1` timed passes after one warm-up pass)."
    precision, cl, comp = VARIANTS[variant]
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", width=a.width, stem=a.stem).to(device)
    if cl and cuda: backbone = backbone.to(memory_format=torch.channels_last)
    net = torch.compile(backbone) if comp else backbone
    opt = torch.optim.AdamW(backbone.parameters(), lr=2e-3, weight_decay=1e-6)
    norm = Normalize(tuple(ds.mean), tuple(ds.std))
    x_all = ds.images.to(device)
    n = len(ds) // a.batch_size * a.batch_size                  # drop_last, like training
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and precision == "bf16" else contextlib.nullcontext()

    def one_pass():
        for s in range(0, n, a.batch_size):
            x = norm(x_all[s:s + a.batch_size].float() / 255)
            if cl and cuda: x = x.contiguous(memory_format=torch.channels_last)
            with amp: loss = net(x).float().pow(2).mean()
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

    backbone.train()
    return samples_per_s(one_pass, n, device, a.epochs)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96], help="image sides in pixels")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="default: all on CUDA, fp32 on a CPU")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = standard)")
    p.add_argument("--stem", default="small", help="ResNet stem: small | stride2 | imagenet")
    p.add_argument("--images", type=int, default=4096, help="images per epoch")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2, help=">= 2: the first epoch is a warm-up")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    a = p.parse_args(argv)
    if a.epochs < 2: p.error("--epochs must be >= 2: the first epoch warms up (and compiles) and is not timed")
    if a.images < a.batch_size: p.error(f"--images ({a.images}) must be at least --batch-size ({a.batch_size})")
    if min(a.sizes) < 16: p.error("--sizes must be >= 16 px (the embedded data's minimum)")
    return a


def main(argv=None) -> list[dict]:
    a = parse(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    variants = a.variants or (list(VARIANTS) if device.type == "cuda" else ["fp32"])
    print(f"commit {git_commit()} | {hardware_info()} | {a.images} images, batch {a.batch_size}, ResNet-18 width {a.width} "
          f"({a.stem} stem), {a.epochs} epochs (first one warms up)")
    print(f"{'size':>5} {'variant':<16} {'ran as':<28} {'SimCLR img/s':>13} {'backbone img/s':>15} {'ratio':>6}")
    rows = []
    for size in a.sizes:
        ds = ClutterShapes("train", num_images=a.images, image_size=size)
        for v in variants:
            ssl, bb = ssl_throughput(v, ds, a, device), backbone_throughput(v, ds, a, device)
            rows.append({"size": size, "variant": v, "ran_as": what_ran(v, device), "simclr_per_s": ssl, "backbone_per_s": bb})
            print(f"{size:>5} {v:<16} {what_ran(v, device):<28} {ssl:>13.1f} {bb:>15.1f} {ssl / bb:>6.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
