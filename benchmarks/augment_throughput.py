#!/usr/bin/env python
"""Two-view augmentation throughput: batched on-device `attnssl.augment` vs a per-image torchvision v2 pipeline.

Both pipelines apply the same SimCLR recipe (random resized crop scale (0.2, 1), flip, colour jitter
(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2; `--blur` adds Gaussian blur p 0.5) to the same ClutterShapes images,
carry the foreground mask through the geometry, and produce two views per image on `--device`:

  (a) batched: uint8 batch -> device -> `simclr_augment` twice (images and masks together);
  (b) per-image: torchvision.transforms.v2 on each (Image, Mask) pair inside a torch DataLoader with
      `--workers` worker processes, collated, then moved to the device.

Throughput is images per second (each image yields two views), timed over whole passes through the data
after a warm-up (a whole pass for (a); worker start-up and two batches for (b), whose
workers persist). Example:

    python benchmarks/augment_throughput.py --images 2048 --size 32 96 --workers 0 2 --device auto
"""
from __future__ import annotations
import argparse, statistics, sys, time

import torch
from torch.utils.data import DataLoader, Dataset


def sync(device: torch.device):
    if device.type == "cuda": torch.cuda.synchronize(device)


class PairViews(Dataset):
    "Per-image two-view dataset over uint8 (N,3,H,W) images and (N,1,H,W) masks, torchvision v2 transforms."
    def __init__(self, images, masks, transform):
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self): return len(self.images)

    def __getitem__(self, i):
        from torchvision import tv_tensors
        img, mask = tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i])
        v1, m1 = self.transform(img, mask)
        v2, m2 = self.transform(img, mask)
        return v1.as_subclass(torch.Tensor), m1.as_subclass(torch.Tensor), v2.as_subclass(torch.Tensor), m2.as_subclass(torch.Tensor)


def torchvision_pipeline(size: int, blur: bool):
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    ops = [v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
           v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2)]
    if blur:
        k = max(3, int(0.1 * size) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return v2.Compose(ops)


def time_passes(one_pass, device, repeats: int, warmup=None) -> float:
    "Warm-up (`warmup()` or one pass), then `repeats` timed passes; returns the median seconds per pass."
    (warmup or one_pass)(); sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); one_pass(); sync(device); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_batched(ds, size, batch_size, device, blur, repeats):
    from attnssl.augment import simclr_augment
    aug1, aug2 = simclr_augment(size, blur=blur), simclr_augment(size, blur=blur)
    n = len(ds); pin = device.type == "cuda"
    images, masks = (ds.images.pin_memory(), ds.masks.pin_memory()) if pin else (ds.images, ds.masks)

    def one_pass():
        perm = torch.randperm(n)
        for s in range(0, n - batch_size + 1, batch_size):     # drop_last, like training
            idx = perm[s:s + batch_size]
            x = images[idx].to(device, non_blocking=True); m = masks[idx].to(device, non_blocking=True)
            v1, mm1 = aug1(x, m); v2, mm2 = aug2(x, m)
    return (n // batch_size) * batch_size / time_passes(one_pass, device, repeats)


def bench_torchvision(ds, size, batch_size, workers, device, blur, repeats):
    loader = DataLoader(PairViews(ds.images, ds.masks, torchvision_pipeline(size, blur)), batch_size=batch_size,
                        shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")

    def one_pass(max_batches=None):
        for i, (v1, m1, v2, m2) in enumerate(loader):
            v1, m1 = v1.to(device, non_blocking=True), m1.to(device, non_blocking=True)
            v2, m2 = v2.to(device, non_blocking=True), m2.to(device, non_blocking=True)
            if max_batches is not None and i + 1 >= max_batches: break
    # warm-up: start the (persistent) workers and run two batches, not a whole pass
    rate = len(loader) * batch_size / time_passes(one_pass, device, repeats, warmup=lambda: one_pass(2))
    del loader
    return rate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048, help="number of ClutterShapes images (default 2048)")
    p.add_argument("--size", type=int, nargs="+", default=[32], help="image size(s) in px (default 32; e.g. 32 96)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers for (b) (default 0 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per measurement (median; default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the main process (0: leave torch's default)")
    p.add_argument("--blur", action="store_true", help="add Gaussian blur p 0.5 to both pipelines")
    args = p.parse_args(argv)

    import kornia, torchvision
    from attnssl.core import get_device, git_commit, hardware_info
    from attnssl.synthetic import ClutterShapes
    if args.threads: torch.set_num_threads(args.threads)
    device = get_device(args.device)
    hw = hardware_info()
    print(f"hardware: {hw['device']} | cpu {hw['cpu']} x{hw['cores']} | torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, kornia {kornia.__version__} | main-process torch threads {torch.get_num_threads()} "
          f"| commit {git_commit()}")
    print(f"recipe: SimCLR crop (0.2,1) + flip + jitter p.8 + gray p.2{' + blur p.5' if args.blur else ''}, "
          f"mask carried along; two views per image; images/s = source images per second (median of {args.repeats})")
    rows = []
    for size in args.size:
        ds = ClutterShapes("train", num_images=args.images, image_size=size, seed=0)
        bs = min(args.batch_size, len(ds))
        rows.append((size, "batched on-device (attnssl.augment)", str(device), "-", bs,
                     bench_batched(ds, size, bs, device, args.blur, args.repeats)))
        for w in args.workers:
            rows.append((size, "per-image torchvision v2 + DataLoader", f"cpu->{device.type}", str(w), bs,
                         bench_torchvision(ds, size, bs, w, device, args.blur, args.repeats)))
    head = f"{'size':>4}  {'images':>6}  {'pipeline':<38} {'device':<9} {'workers':>7} {'batch':>5} {'images/s':>10} {'vs batched':>10}"
    print(head); print("-" * len(head))
    for size, name, dev, w, bs, rate in rows:
        base = next(r[5] for r in rows if r[0] == size and r[3] == "-")
        print(f"{size:>4}  {args.images:>6}  {name:<38} {dev:<9} {w:>7} {bs:>5} {rate:>10.0f} {rate / base:>9.2f}x")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
