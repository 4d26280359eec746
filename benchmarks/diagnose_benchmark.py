#!/usr/bin/env python
"""Why does contrastive SSL learn so little on the embedded ClutterShapes data? One short run per call, one factor
changed at a time, kNN top-1 on a validation split carved from the training images (the test split is never
touched: these runs choose the benchmark's settings).

Each run pre-trains a method (default SimCLR, the `cpu` recipe of nbs/experiments/recipes.yaml) on the first
`--images` training images and measures kNN top-1 (k = 50, T = 0.1) of the next 1,000 training images against
them, at random init and every 10 epochs. Factors:

    --views random_crop | oracle | full     two random crops, or (crop, object-only view) from the ground-truth
                                            mask (the oracle attention view), or (crop, whole image)
    --clutter C --object-area LO HI         the dataset's knobs: clutter, object size and how much object
    --object-colour V                       colours vary (1: random, 0: one grey; our calibration knob)
    --colour-jitter S --p-gray P            colour augmentation strength on every view
    --intervene flat_background             a diagnosis-only edit of the generator: every image gets the same
                                            mid-grey background field (rows of this file with "grey_object" used
                                            an edit that is now the knob --object-colour 0: the same pixels)
    --backbone JSON --epochs N --images N   capacity and budget
    --train JSON --method-kw JSON           TrainConfig and method hyperparameter overrides (over the recipe's)

    python benchmarks/diagnose_benchmark.py --views oracle --object-area 0.2 0.5 --clutter 0
    python benchmarks/diagnose_benchmark.py --object-colour 0 --object-area 0.2 0.5 --clutter 0

Each run appends one JSON line (settings, kNN trajectory, last-epoch diagnostics, minutes, hardware, commit)
to `--out`; nbs/16_diagnosis reads benchmarks/results/diagnosis.jsonl.
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path

import torch

import attnssl.synthetic as S
from attnssl.attention import GroundTruthSource
from attnssl.augment import light_augment, simclr_augment
from attnssl.core import git_commit, hardware_info
from attnssl.evaluate import extract_features, knn_classify
from attnssl.experiments import load_recipe
from attnssl.methods import build_method
from attnssl.models import build_backbone
from attnssl.train import Trainer, TrainConfig
from attnssl.views import build_views

VIEWS = {"random_crop": ("two_crop", {}), "oracle": ("attention", {"mode": "hard"}), "full": ("attention", {"mode": "full"})}
INTERVENTIONS = {   # diagnosis only: which per-image generator parameter is made the same for every image
    "flat_background": lambda p: p.update(field_grey=torch.full_like(p["field_grey"], 0.5), field_col=torch.full_like(p["field_col"], 0.5)),
}


def intervene(names) -> None:
    "Patch the generator so that the parameters named by `names` are constant across images (not cached)."
    if not names: return
    draw = S._draw_params
    def patched(g, B):
        p = draw(g, B)
        for n in names: INTERVENTIONS[n](p)
        return p
    S._draw_params = patched


def run(a) -> dict:
    torch.manual_seed(a.seed)
    intervene(a.intervene)
    data = {"clutter": a.clutter, "object_area": tuple(a.object_area), "object_colour": a.object_colour}
    full = S.ClutterShapes("train", num_images=a.images + a.val_images, cache=not a.intervene, **data)
    ssl, val = full.subset(range(a.images)), full.subset(range(a.images, a.images + a.val_images))
    recipe = load_recipe(a.recipe)
    backbone = build_backbone(**{"name": "resnet18", "width": 8, **recipe["backbone"], **(a.backbone or {})})
    def knn() -> float:
        return knn_classify(*extract_features(backbone, ssl), *extract_features(backbone, val), k=50, temperature=0.1)["top1"]
    at_init = knn()
    name, opts = VIEWS[a.views]
    views = build_views(name, ssl, **opts, **({"source": GroundTruthSource()} if a.views == "oracle" else {}))
    if a.colour_jitter is not None or a.p_gray is not None:
        s = 0.5 if a.colour_jitter is None else a.colour_jitter     # SimCLR's colour strength: 0.5 = (0.4, 0.4, 0.4, 0.1)
        colour = {"jitter": (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), "p_gray": 0.2 if a.p_gray is None else a.p_gray}
        if hasattr(views, "augs"): views.augs = (simclr_augment(32, **colour),) * 2
        else: views.augment, views.light = simclr_augment(32, **colour), light_augment(32, **colour)
    train = {**recipe["train"], "batch_size": 128, **a.train}
    config = TrainConfig(epochs=a.epochs, device="cpu", knn_k=50, knn_every=10, progress=False, seed=a.seed, **train)
    method = build_method(a.method, backbone, **{**recipe["methods"].get(a.method, {}), **a.method_kw})
    trainer = Trainer(method, views, ssl, config, eval_sets=(ssl, val))
    start = time.time(); last = trainer.fit()
    return {"method": a.method, "views": a.views, "data": {**data, "images": a.images, "val_images": a.val_images},
            "intervene": a.intervene, "colour_jitter": a.colour_jitter, "p_gray": a.p_gray, "recipe": a.recipe,
            "backbone": a.backbone, "train": a.train, **({"method_kw": a.method_kw} if a.method_kw else {}), "epochs": a.epochs, "seed": a.seed, "knn_init": round(at_init, 1),
            "knn": [[h["epoch"] + 1, round(h["knn_top1"], 1)] for h in trainer.history if "knn_top1" in h],
            **{k: round(last[k], 3) for k in ("loss", "s_pos", "s_neg", "uniformity") if k in last},
            "minutes": round((time.time() - start) / 60, 1), "threads": torch.get_num_threads(),
            "hardware": hardware_info()["device"], "commit": git_commit()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="simclr")
    p.add_argument("--views", choices=list(VIEWS), default="random_crop")
    p.add_argument("--clutter", type=float, default=1.0)
    p.add_argument("--object-area", type=float, nargs=2, default=(0.05, 0.4))
    p.add_argument("--object-colour", type=float, default=1.0)
    p.add_argument("--intervene", nargs="*", choices=list(INTERVENTIONS), default=[])
    p.add_argument("--colour-jitter", type=float, default=None, help="SimCLR colour strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s)")
    p.add_argument("--p-gray", type=float, default=None)
    p.add_argument("--recipe", default="cpu")
    p.add_argument("--backbone", type=json.loads, default=None, help='build_backbone overrides (JSON), e.g. \'{"width": 16}\'')
    p.add_argument("--train", type=json.loads, default={}, help="TrainConfig overrides (JSON)")
    p.add_argument("--method-kw", type=json.loads, default={},
                   help='method hyperparameter overrides (JSON, over the recipe\'s), e.g. \'{"momentum": 0.9}\'')
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="diagnosis.jsonl", help="JSON lines file the result is appended to")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.images < 128 or a.val_images < 1:
        p.error("need --epochs >= 1, --images >= 128 (one batch) and --val-images >= 1")
    torch.set_num_threads(a.threads)
    row = run(a)
    line = json.dumps(row)
    print(line, flush=True)
    with open(a.out, "a") as f: f.write(line + "\n")
    return json.loads(line)


if __name__ == "__main__":
    main(sys.argv[1:])
