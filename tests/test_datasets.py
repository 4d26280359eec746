"""datasets: TensorDataset, make_loader (determinism, sharding), registry, and the real-dataset loaders
(on miniature files written here in each official format)."""
import gzip, io, os, pickle, struct, tarfile, warnings, zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnssl.core import ConfigError
from attnssl.datasets import (DATASET_STATS, TensorDataset, collate_items, dataset_names, get_dataset, make_loader)

def _rand_images(n, h=8, w=8, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

# ---------------------------------------------------------------- TensorDataset

def test_tensor_dataset_items_and_batches():
    imgs, masks = _rand_images(6), torch.randint(0, 2, (6, 1, 8, 8), dtype=torch.uint8)
    ds = TensorDataset(imgs, torch.tensor([0, 1, 2, -1, -1, 0]), masks, classes=["a", "b", "c"])
    assert ds.num_classes == 3 and ds.has_masks and len(ds) == 6 and ds.labels.dtype == torch.long
    it = ds[-1]
    assert it["index"] == 5 and it["label"] == 0 and torch.equal(it["mask"], masks[5])
    b = ds.get_batch(torch.tensor([4, 1]))
    assert b["image"].dtype == torch.uint8 and b["index"].dtype == torch.long and b["label"].tolist() == [-1, 1]
    assert torch.equal(b["mask"], masks[[4, 1]])
    # get_batch == collated items
    ref = collate_items([ds[4], ds[1]])
    for k in ref: assert torch.equal(ref[k], b[k])
    sub = ds.subset([5, 0])
    assert len(sub) == 2 and torch.equal(sub.images, imgs[[5, 0]]) and sub.classes == ds.classes
    with pytest.raises(IndexError): ds[6]

def test_tensor_dataset_stats_and_validation():
    imgs = torch.zeros(4, 3, 2, 2, dtype=torch.uint8); imgs[:, 1] = 255; imgs[:2, 2] = 255
    ds = TensorDataset(imgs)
    assert ds.mean == (0.0, 1.0, 0.5) and ds.std == (0.0, 0.0, 0.5) and ds.labels.tolist() == [-1] * 4
    assert TensorDataset(imgs, mean=(0.1, 0.2, 0.3), std=(1, 1, 1)).mean == (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match="uint8"): TensorDataset(imgs.float())
    with pytest.raises(ConfigError, match="labels"): TensorDataset(imgs, torch.zeros(3))
    with pytest.raises(ConfigError, match="masks"): TensorDataset(imgs, masks=torch.zeros(4, 1, 3, 3, dtype=torch.uint8))
    for name, (m, s) in DATASET_STATS.items():
        assert len(m) == len(s) == 3 and all(0 < v < 1 for v in m + s), name

# ---------------------------------------------------------------- make_loader

def test_loader_order_is_function_of_seed_and_epoch():
    ds = TensorDataset(_rand_images(37))
    a, b = make_loader(ds, 5, seed=7), make_loader(ds, 5, seed=7)
    a.set_epoch(3); b.set_epoch(3)
    ia = [x["index"] for x in a]; ib = [x["index"] for x in b]
    assert len(ia) == len(a) == 7 and all(torch.equal(x, y) for x, y in zip(ia, ib))
    assert all(torch.equal(x["image"], ds.images[x["index"]]) for x in a)
    b.set_epoch(4)
    assert not torch.equal(torch.cat(ia), torch.cat([x["index"] for x in b]))
    c = make_loader(ds, 5, seed=8); c.set_epoch(3)
    assert not torch.equal(torch.cat(ia), torch.cat([x["index"] for x in c]))
    # a fresh loader resumed at epoch 3 sees the same batches (no hidden state)
    d = make_loader(ds, 5, seed=7); list(d); d.set_epoch(3)
    assert all(torch.equal(x["index"], y) for x, y in zip(d, ia))
    assert len(torch.cat(ia).unique()) == 35

def test_loader_no_shuffle_and_last_batch():
    ds = TensorDataset(_rand_images(7))
    ld = make_loader(ds, 3, shuffle=False, drop_last=False)
    assert len(ld) == 3 and [x["index"].tolist() for x in ld] == [[0, 1, 2], [3, 4, 5], [6]]
    assert len(make_loader(ds, 3, shuffle=False)) == 2
    with pytest.raises(ConfigError, match="batch_size"): make_loader(ds, 8)
    with pytest.raises(ConfigError, match="rank"): make_loader(ds, 2, rank=2, world_size=2)

@pytest.mark.parametrize("world_size", [2, 3])
def test_loader_sharding_disjoint_and_complete(world_size):
    n = 24
    ds = TensorDataset(_rand_images(n))
    for epoch in range(2):
        parts = []
        for r in range(world_size):
            ld = make_loader(ds, 2, seed=1, rank=r, world_size=world_size, drop_last=False); ld.set_epoch(epoch)
            parts.append(torch.cat([x["index"] for x in ld]))
        assert all(len(p) == n // world_size for p in parts)
        allidx = torch.cat(parts)
        assert len(allidx.unique()) == n and sorted(allidx.tolist()) == list(range(n))  # disjoint, union = all
    # uneven: padded so every rank gets the same number of batches
    ds = TensorDataset(_rand_images(10))
    lds = [make_loader(ds, 2, rank=r, world_size=3, drop_last=False) for r in range(3)]
    assert len({len(l) for l in lds}) == 1 and set(torch.cat([l.indices() for l in lds]).tolist()) == set(range(10))

class _ItemOnly(torch.utils.data.Dataset):
    "A file-backed-style dataset without get_batch."
    def __init__(self, n): self.images = _rand_images(n)
    def __len__(self): return len(self.images)
    def __getitem__(self, i): return {"image": self.images[i], "index": i, "label": i % 3}

def test_loader_dataloader_path_matches_tensor_path():
    items, tens = _ItemOnly(12), TensorDataset(_rand_images(12))
    la, lb = make_loader(items, 4, seed=2), make_loader(tens, 4, seed=2)
    for x, y in zip(la, lb):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], items.images[x["index"]])
        assert x["label"].dtype == torch.long and x["label"].tolist() == (x["index"] % 3).tolist()

# ---------------------------------------------------------------- registry

def test_registry_names_and_errors():
    names = dataset_names()
    for n in ["clutter"]:  # REAL-LOADERS-PENDING
        assert n in names
    with pytest.raises(ConfigError) as e: get_dataset("imagenet-1k")
    assert "valid names" in str(e.value) and "clutter" in str(e.value)  # REAL-LOADERS-PENDING
    with pytest.raises(ConfigError, match="valid splits"): get_dataset("clutter", split="val")
