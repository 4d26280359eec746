#!/usr/bin/env python
"""Does a method learn in a short run? kNN top-1 at random initialisation and every few epochs of pre-training.

The setting is nbs/08_train's "every method" section (ClutterShapes, width-8 small-stem ResNet-18, batch 128, kNN
k = 50, T = 0.1 on 1,000 test images; the optimiser and the method's hyperparameters are the `cpu` recipe of
nbs/experiments/recipes.yaml, e.g. AdamW lr 2e-3 and BYOL's momentum 0.99; --hparams adds to them) and every part of it can be
overridden, so one command tests one hypothesis about why a method does or does not rise above its random-init kNN. Each run appends one
JSON line (settings, kNN trajectory, last-epoch diagnostics, minutes, hardware, commit) to `--out`. Examples:

    python benchmarks/short_run_knn.py --method byol --hparams '{"momentum": 0.99}' --epochs 30
    python benchmarks/short_run_knn.py --method simsiam --augment '{"p_jitter": 0, "p_gray": 0}'   # no colour jitter
    python benchmarks/short_run_knn.py --method simsiam --train '{"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4}'
    python benchmarks/short_run_knn.py --method dino --hparams '{"teacher_temp": 0.02, "use_bn_in_head": true}'
    python benchmarks/short_run_knn.py --method dino --backbone '{"name": "vit_tiny", "img_size": 32, "patch_size": 4, "depth": 2}'
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path

import torch

from attnssl.augment import Normalize, simclr_augment
from attnssl.core import git_commit, hardware_info
from attnssl.evaluate import extract_features, knn_classify
from attnssl.experiments import load_recipe
from attnssl.methods import build_method
from attnssl.models import build_backbone
from attnssl.synthetic import ClutterShapes
from attnssl.train import Trainer, TrainConfig
from attnssl.views import TwoCropViews, build_views

RECIPE = load_recipe("cpu")   # nbs/experiments/recipes.yaml: the one place for short-run settings
DEFAULT_TRAIN = {"batch_size": 128, **RECIPE["train"]}
DINO_WARMUP = {"warmup_epochs": 1}   # 08_train warms DINO up for one epoch
VIT_TRAIN = {"batch_size": 128, "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.04}   # DINO's ViT recipe


def knn_top1(backbone, memory, test) -> float:
    ftr, ytr = extract_features(backbone, memory); fte, yte = extract_features(backbone, test)
    return knn_classify(ftr, ytr, fte, yte, k=50, temperature=0.1)["top1"]


def make_views(method: str, train_set, views: dict, augment: dict | None):
    "nbs/08_train's views; `augment` (simclr_augment keyword arguments) replaces the two-crop colour/crop recipe."
    if method == "dino": return build_views("multi_crop", train_set, **{"n_local": 2, "local_size": 12, **views})
    if augment is None: return build_views("two_crop", train_set, **views)
    aug = simclr_augment(train_set.image_size, **{k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()})
    return TwoCropViews((aug, aug), Normalize(tuple(train_set.mean), tuple(train_set.std)))


def run(a) -> dict:
    torch.manual_seed(a.seed)
    data = {"object_area": tuple(a.object_area), "clutter": a.clutter}
    train_set = ClutterShapes("train", num_images=a.images, **data)
    test_set = ClutterShapes("test", num_images=1000, **data)
    if a.backbone: backbone = build_backbone(**a.backbone)
    else: backbone = build_backbone("resnet18", width=a.width, stem="small")
    at_init = knn_top1(backbone, train_set, test_set)
    hparams = {**RECIPE["methods"].get(a.method, {}), **a.hparams}
    if a.method == "memory_bank": hparams.setdefault("num_samples", len(train_set))
    vit = bool(a.backbone) and a.backbone["name"].startswith("vit")
    train = {**(VIT_TRAIN if vit else DEFAULT_TRAIN), **(DINO_WARMUP if a.method == "dino" else {}), **a.train}
    config = TrainConfig(epochs=a.epochs, device="cpu", knn_k=50, knn_every=a.knn_every, progress=False,
                         seed=a.seed, **train)
    trainer = Trainer(build_method(a.method, backbone, **hparams), make_views(a.method, train_set, a.views, a.augment),
                      train_set, config, eval_sets=(train_set, test_set))
    start = time.time(); last = trainer.fit()
    return {"method": a.method, "epochs": a.epochs, "hparams": hparams, "train": train, "views": a.views,
            "augment": a.augment, "data": {**data, "images": a.images}, "width": a.width, "backbone": a.backbone, "seed": a.seed,
            "knn_init": round(at_init, 1),
            "knn": [[h["epoch"] + 1, round(h["knn_top1"], 1)] for h in trainer.history if "knn_top1" in h],
            **{k: round(last[k], 3) for k in ("loss", "s_pos", "s_neg") if k in last},
            "minutes": round((time.time() - start) / 60, 1), "threads": torch.get_num_threads(),
            "hardware": hardware_info()["device"], "commit": git_commit(Path(__file__).parent)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    j = json.loads
    p.add_argument("--method", required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--hparams", type=j, default={}, help="method hyperparameters (JSON)")
    p.add_argument("--train", type=j, default={}, help="TrainConfig overrides (JSON), e.g. optimizer, lr, weight_decay")
    p.add_argument("--views", type=j, default={}, help="build_views options (JSON), e.g. crop_scale")
    p.add_argument("--augment", type=j, default=None, help="simclr_augment arguments (JSON) for both views")
    p.add_argument("--clutter", type=float, default=1.0)
    p.add_argument("--object-area", type=float, nargs=2, default=(0.2, 0.5))
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--backbone", type=j, default=None,
                   help='build_backbone arguments (JSON) replacing the default encoder, e.g. \'{"name": "resnet18", "width": 8, "stem": "small"}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--knn-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="short_run_knn.jsonl", help="JSON lines file the result is appended to")
    a = p.parse_args(argv)
    if a.backbone is not None and not (isinstance(a.backbone, dict) and "name" in a.backbone):
        p.error('--backbone takes a JSON object with a "name", e.g. \'{"name": "resnet18", "width": 8}\'')
    if a.threads: torch.set_num_threads(a.threads)
    line = json.dumps(run(a))
    row = json.loads(line)                  # what the file holds (tuples become lists)
    print(line, flush=True)
    with open(a.out, "a") as f: f.write(line + "\n")
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
