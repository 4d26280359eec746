"""ClutterShapes: determinism, splits, cache, masks/boxes/areas, labels."""
import os
import pytest
import torch
import torch.nn.functional as F

from attnssl.core import ConfigError
from attnssl.datasets import get_dataset, make_loader
from attnssl.synthetic import (CHUNK, CLASSES, ClutterShapes, check_clutter, check_object_area, clutter_cache_path,
                               generate_clutter, masks_to_boxes, render_shapes, shape_sdf, unit_areas)

N = CHUNK  # one generation chunk: every chunk costs the same, so tests reuse few

@pytest.fixture(scope="module")
def train():
    return ClutterShapes("train", num_images=N, seed=3)

def test_contract_attributes(train):
    assert len(train) == N and train.classes == list(CLASSES) and train.num_classes == 10 and train.has_masks
    assert train.images.dtype == torch.uint8 and train.images.shape == (N, 3, 32, 32)
    assert train.masks.dtype == torch.uint8 and train.masks.shape == (N, 1, 32, 32)
    assert set(train.masks.unique().tolist()) <= {0, 1}
    assert train.labels.dtype == torch.long and train.boxes.shape == (N, 4) and train.boxes.dtype == torch.float32
    assert len(train.mean) == 3 and len(train.std) == 3 and all(0 < v < 1 for v in train.mean + train.std)
    item = train[5]
    assert set(item) == {"image", "index", "label", "mask"} and item["index"] == 5
    assert torch.equal(item["image"], train.images[5]) and item["label"] == int(train.labels[5])
    b = train.get_batch(torch.tensor([7, 2]))
    assert torch.equal(b["mask"], train.masks[[7, 2]]) and b["index"].tolist() == [7, 2]

def test_deterministic_for_seed_and_prefix_stable(train):
    a = generate_clutter(N + 10, seed=3)         # crosses a chunk boundary
    for k, v in [("images", train.images), ("masks", train.masks), ("labels", train.labels), ("boxes", train.boxes)]:
        assert torch.equal(a[k][:N], v)           # same seed -> same data; first n independent of how many
    b = generate_clutter(20, seed=4)
    assert not torch.equal(b["images"], a["images"][:20])

def test_splits_disjoint(train):
    te = generate_clutter(N, seed=3, split="test")
    seen = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in seen for x in te["images"])

def test_cache_written_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNSSL_CACHE", str(tmp_path))
    first = ClutterShapes("test", num_images=40, seed=5)
    path = clutter_cache_path("test", 40, 32, 5, 1.0)
    assert path.exists() and not first.from_cache and str(path).startswith(str(tmp_path))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
    import attnssl.synthetic as syn
    monkeypatch.setattr(syn, "generate_clutter", lambda *a, **k: pytest.fail("cache not used"))
    second = ClutterShapes("test", num_images=40, seed=5)
    assert second.from_cache and torch.equal(first.images, second.images) and torch.equal(first.boxes, second.boxes)

def test_corrupt_cache_regenerated(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNSSL_CACHE", str(tmp_path))
    ref = ClutterShapes("train", num_images=20, seed=1, cache=False)
    clutter_cache_path("train", 20, 32, 1, 1.0).write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="regenerating"):
        ds = ClutterShapes("train", num_images=20, seed=1)
    assert torch.equal(ds.images, ref.images)

def test_boxes_enclose_masks_tightly(train):
    m = train.masks[:, 0].bool()
    for i in range(len(train)):
        ys, xs = torch.nonzero(m[i], as_tuple=True)
        assert train.boxes[i].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert torch.equal(masks_to_boxes(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)), torch.zeros(1, 4))

def test_object_area_in_range(train):
    area = train.masks.float().mean((1, 2, 3))
    assert area.min() >= 0.035 and area.max() <= 0.42      # designed 5-40%, rasterised at 32 px
    assert area.median() > 0.1

def test_labels_balanced(train):
    counts = torch.bincount(train.labels, minlength=10)
    assert counts.tolist() == [N // 10] * 10                 # exactly balanced within a chunk
    assert 1 <= torch.bincount(train.labels[:50], minlength=10).min()  # shuffled within a chunk

def test_mask_matches_rendered_object():
    # one shape, rendered alone: the mask is the sdf >= 0 region, and the object colour fills it
    t = torch.arange(32, dtype=torch.float32) + 0.5
    Y, X = torch.meshgrid(t, t, indexing="ij")
    sdf = render_shapes(torch.tensor([0]), torch.tensor([16.0]), torch.tensor([16.0]), torch.tensor([10.0]),
                        torch.tensor([0.0]), X, Y)
    area = (sdf >= 0).float().sum().item()
    assert abs(area - torch.pi * 9.5 ** 2) < 12              # circle of radius 0.95 * 10 px

def test_shapes_distinct_and_in_unit_disc():
    t = torch.linspace(-1, 1, 65)
    y, x = torch.meshgrid(t, t, indexing="ij")
    masks = [(shape_sdf(c, x, y) > 0) for c in range(10)]
    for c, m in enumerate(masks):
        assert not m[x ** 2 + y ** 2 > 1].any()
    # no two classes are the same shape up to rotation: compare rotation-invariant radial profiles
    rho = torch.sqrt(x ** 2 + y ** 2)
    prof = torch.stack([torch.stack([m[(rho >= r) & (rho < r + 0.1)].float().mean() for r in torch.arange(0, 1, 0.1)])
                        for m in masks])
    d = torch.cdist(prof, prof) + torch.eye(10) * 10
    assert d.min() > 0.05
    assert (unit_areas() > 1).all()

def test_bad_options():
    with pytest.raises(ConfigError, match="valid splits"): ClutterShapes("val", num_images=10)
    with pytest.raises(ConfigError, match="image_size"): generate_clutter(10, image_size=8)
    with pytest.raises(ConfigError, match="num_images"): generate_clutter(0)

def test_other_sizes_and_registry(train):
    ds = get_dataset("clutter", "train", num_images=12, image_size=48, seed=3, cache=False)
    assert ds.images.shape == (12, 3, 48, 48) and ds.masks.shape == (12, 1, 48, 48)
    assert torch.equal(ds.labels, train.labels[:12])         # same scenes at any resolution
    rel = (ds.masks.float().mean((1, 2, 3)) - train.masks[:12].float().mean((1, 2, 3))).abs()
    assert rel.max() < 0.02
    with pytest.raises(ConfigError, match="clutter option"): get_dataset("clutter", num_imgs=3)
    ld = make_loader(ds, 4, seed=0)
    b = next(iter(ld))
    assert b["mask"].shape == (4, 1, 48, 48)

def _background_roughness(data) -> float:
    "Mean absolute horizontal step between neighbouring pixels that are both well outside the object."
    img, m = data["images"].float(), data["masks"].float()
    near = F.max_pool2d(m, 5, stride=1, padding=2) > 0                         # object dilated by 2 px
    both = ~(near[..., 1:] | near[..., :-1])
    return ((img[..., 1:] - img[..., :-1]).abs() * both).sum().item() / (both.sum().item() * 3)

def test_clutter_level_changes_background_only():
    levels = {c: generate_clutter(100, seed=2, clutter=c) for c in (0.0, 0.5, 1.0)}
    full = generate_clutter(100, seed=2)
    assert torch.equal(levels[1.0]["images"], full["images"])                  # 1 is the default
    for c, d in levels.items():                                                # same objects at every level
        for k in ("labels", "masks", "boxes"): assert torch.equal(d[k], full[k]), (c, k)
        inside = d["masks"].bool().expand_as(d["images"])
        obj = d["images"][inside].float(); ref = full["images"][inside].float()
        assert (obj - ref).abs().mean() < 25                                   # object pixels: only anti-aliased rims move
    rough = [_background_roughness(levels[c]) for c in (0.0, 0.5, 1.0)]
    assert rough[0] < rough[1] < rough[2], rough                               # less clutter, smoother background

def test_clutter_option_cached_and_validated(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNSSL_CACHE", str(tmp_path))
    a = ClutterShapes("test", num_images=20, seed=5, clutter=0.25)
    b = get_dataset("clutter", "test", num_images=20, seed=5, clutter=0.25)
    assert b.from_cache and torch.equal(a.images, b.images) and a.clutter == 0.25 and "clutter=0.25" in repr(a)
    assert clutter_cache_path("test", 20, 32, 5, 0.25).exists() and not clutter_cache_path("test", 20, 32, 5, 1.0).exists()
    for bad in (-0.1, 1.5, "lots", None, float("nan")):
        with pytest.raises(ConfigError, match=r"clutter must be a number in \[0, 1\]"): check_clutter(bad)
    with pytest.raises(ConfigError, match="clutter must be"): ClutterShapes("test", num_images=4, clutter=2)

def test_object_area_option():
    full = generate_clutter(200, seed=2)
    big = generate_clutter(200, seed=2, object_area=(0.2, 0.5))
    area, area_full = big["masks"].float().mean((1, 2, 3)), full["masks"].float().mean((1, 2, 3))
    assert area.min() >= 0.18 and area.max() <= 0.52                           # designed 20-50%, rasterised
    assert torch.equal(big["labels"], full["labels"])                         # same scenes, larger objects:
    assert (area > area_full - 0.01).all() and area.mean() > area_full.mean() + 0.1  # (frame clipping aside)
    assert torch.equal(generate_clutter(20, seed=2, object_area=[0.05, 0.40])["images"], full["images"][:20])
    fixed = generate_clutter(50, seed=2, object_area=(0.3, 0.3))["masks"].float().mean((1, 2, 3))
    assert (fixed - 0.3).abs().max() < 0.05
    for bad in ((0.0, 0.3), (0.4, 0.2), (0.1, 0.9), 0.3, ("a", "b")):
        with pytest.raises(ConfigError, match=r"object_area must be \(min, max\)"): check_object_area(bad)

def test_options_through_the_registry(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNSSL_CACHE", str(tmp_path))
    ds = get_dataset("clutter", "train", num_images=10, seed=1, clutter=0.0, object_area=[0.2, 0.5])
    assert ds.clutter == 0.0 and ds.object_area == (0.2, 0.5)
    assert ds.cache_path == clutter_cache_path("train", 10, 32, 1, 0.0, (0.2, 0.5)) and ds.cache_path.exists()
    assert ds.cache_path != clutter_cache_path("train", 10, 32, 1, 0.0)
