#!/usr/bin/env python
"""How much of the image does an attention view keep? For the attention sources of the `small` profile's E2 (the
ViT trained with DINO by the pipeline, the centre prior, the ground-truth oracle), the soft mask the attention
view multiplies the image by (magnitude scale `s`, max-normalised map, as E2) measured on test images against
the object masks: mean weight, share of pixels at full weight, mean weight on the object and on the background,
and the share of pixels a hard view at mass `t` keeps. A view that keeps most of the background is close to
the "full image" control, whatever the map's ranking (E0's AP) says.

    python benchmarks/view_weights.py                      # the small profile's sources, s = 2
    python benchmarks/view_weights.py --s 1 --norm minmax  # another magnitude scale / normalisation

The ViT comes from the run cache when the small profile has trained it (else it is trained here, minutes on a
CPU). One JSON line per call (settings, rows, commit, hardware) is appended to `--out`.
"""
from __future__ import annotations
import argparse, json, sys
from pathlib import Path

import torch

from attnssl import experiments as ex
from attnssl.attention import hard_mask, postprocess
from attnssl.core import git_commit, hardware_info


def profile_base(profile: str = "small", device: str = "cpu") -> tuple[dict, dict]:
    "E2's base config and shared parameters under `profile` (nbs/experiments/profiles.yaml), as the template builds them."
    from attnssl.cli import profile_parameters
    params = ex.shared_parameters({**profile_parameters(profile)["E2"], "device": device})
    return ex.base_config(params), params


def view_weights(maps: torch.Tensor, masks: torch.Tensor, size: int, s: float, t: float, norm: str) -> dict:
    "Soft-view statistics (in %) of raw `maps` (B,1,h,w) against object `masks` (B,1,H,W)."
    m = postprocess(maps, (size, size), s=s, norm=norm)
    obj = masks.float()
    row = {"mean weight": m.mean(), "pixels at full weight": (m >= 0.999).float().mean(),
           "weight on object": (m * obj).sum() / obj.sum(), "weight on background": (m * (1 - obj)).sum() / (1 - obj).sum(),
           f"hard view (t={t}) keeps": hard_mask(maps, t, (size, size)).float().mean()}
    return {k: round(100 * float(v), 1) for k, v in row.items()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="test images measured")
    p.add_argument("--s", type=float, default=2.0, help="magnitude scale of the soft view (E2: 2)")
    p.add_argument("--t", type=float, default=0.6, help="attention mass of the hard view (E2: 0.6)")
    p.add_argument("--norm", default="max", help="map normalisation before scaling: max (E2) | minmax")
    p.add_argument("--profile", default="small", help="whose E2 sources are measured (default: small)")
    p.add_argument("--out", default=str(Path(__file__).parent/"results"/"view_weights.jsonl"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    base, params = profile_base(a.profile)
    test = ex.build_datasets(base)["test"]
    vit = ex.attention_spec(base, {**params, "attn_source": "vit"})
    sources = {f"ViT ({vit['pretrain']['train']['epochs']} ep, DINO)": vit,
               "centre prior": {"name": "centre_prior"}, "oracle (object mask)": {"name": "ground_truth"}}
    rows = []
    for name, spec in sources.items():
        r = ex.source_maps(spec, base, test, n=a.images, device="cpu")
        rows.append({"source": name, **view_weights(r["maps"], r["masks"], 32, a.s, a.t, a.norm)})
        print(rows[-1], flush=True)
    area = round(100 * float(r["masks"].float().mean()), 1)
    print(f"object area: {area} % of the image")
    line = {"profile": a.profile, "s": a.s, "t": a.t, "norm": a.norm, "images": a.images, "object_area_pct": area, "rows": rows,
            "commit": git_commit(), "hardware": hardware_info()["device"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f: f.write(json.dumps(line) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
