"""View generators: geometry shared by images and maps, the attention view's algebra, ContrastiveCrop boxes,
schedules, checkpoints, the registry and degenerate input."""
import pytest
import torch
import torch.nn as nn

from attnssl.augment import Normalize, light_augment, simclr_augment, to_float
from attnssl.attention import GroundTruthSource, MapCache
from attnssl.core import ConfigError, atomic_torch_save
from attnssl.datasets import TensorDataset
from attnssl.views import (AttentionViews, ContrastiveCropViews, IntervalViews, MultiCropViews, TwoCropViews,
                           VIEWS, beta_centred_boxes, build_views, heatmap_boxes)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _masks(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i in range(n):
        s = int(torch.randint(size // 4, size // 2, (1,), generator=g))
        y, x = torch.randint(0, size - s, (2,), generator=g).tolist()
        m[i, :, y:y + s, x:x + s] = 1
        m[i, :, y + s // 2:y + s, x:x + s // 3] = 0          # not a square: flips and crops are visible
    return m


def _dataset(n=8, size=32, silhouette=False, seed=0):
    "Toy data; `silhouette`: the image is the mask itself (white object on black), so view and map must agree."
    masks = _masks(n, size, seed)
    if silhouette: images = masks.repeat(1, 3, 1, 1) * 255
    else:
        g = torch.Generator().manual_seed(seed + 1)
        images = torch.where(masks.bool(), torch.tensor(220, dtype=torch.uint8),
                             (torch.rand(n, 3, size, size, generator=g) * 90).to(torch.uint8))
    return TensorDataset(images, torch.arange(n) % 2, masks, classes=["a", "b"], mean=MEAN, std=STD)


def _batch(ds, idx=None):
    return ds.get_batch(torch.arange(len(ds)) if idx is None else torch.as_tensor(idx))


def _no_colour(size=None, crop=True, scale=(0.2, 1.0)):
    if not crop: return light_augment(size, p_jitter=0.0, p_gray=0.0)
    return simclr_augment(size, scale=scale, p_jitter=0.0, p_gray=0.0)


def _gt_cache(ds):
    return MapCache(batch_size=4).build(ds, GroundTruthSource())


NORM = Normalize(MEAN, STD)

def _generators(ds, size=24):
    "One of every generator, colour off, maps from the ground truth."
    cc = ContrastiveCropViews(_no_colour(crop=False), NORM, len(ds), size, warmup_epochs=0, source=GroundTruthSource(),
                              dataset=ds, batch_size=4)
    cc.on_epoch_start(0)
    return {
        "two_crop": TwoCropViews(_no_colour(size), NORM),
        "multi_crop": MultiCropViews(_no_colour(size, scale=(0.4, 1)), _no_colour(12, scale=(0.05, 0.4)), NORM, n_local=2),
        "attention_soft": AttentionViews(_no_colour(size), _no_colour(crop=False), NORM, _gt_cache(ds), size=size),
        "attention_hard_crop": AttentionViews(_no_colour(size), _no_colour(crop=False), NORM, _gt_cache(ds), mode="hard",
                                              crop=(0.2, 1.0), size=size),
        "attention_full": AttentionViews(_no_colour(size), _no_colour(crop=False), NORM, mode="full", size=size),
        "contrastive_crop": cc,
        "interval": IntervalViews(TwoCropViews(_no_colour(size), NORM),
                                  AttentionViews(_no_colour(size), _no_colour(crop=False), NORM, _gt_cache(ds), size=size),
                                  warmup_epochs=1),
    }


@pytest.mark.parametrize("name", ["two_crop", "multi_crop", "attention_soft", "attention_hard_crop", "attention_full",
                                  "contrastive_crop", "interval"])
def test_image_and_map_stay_aligned(name):
    ds = _dataset(silhouette=True)
    gen = _generators(ds)[name]
    torch.manual_seed(0)
    for epoch in (0, 1):                                   # the interval schedule switches generator at epoch 1
        views, maps = gen.generate(_batch(ds), epoch)
        assert len(views) == len(maps) == gen.num_views
        for v, m in zip(views, maps):
            img = NORM.inverse(v)                           # back to [0,1] pixels
            assert torch.allclose(img[:, 0:1], m, atol=1e-4), f"{name}: view and its mask disagree"
            assert torch.allclose(img[:, 0], img[:, 2], atol=1e-5)
        if isinstance(gen, AttentionViews) and gen.mode != "full":   # the attention map had the same geometry
            assert torch.allclose(gen.last_map, maps[1], atol=1e-4)
    assert any(m.flatten(1).amax(1).min() > 0.5 for m in maps)   # not trivially empty


def test_views_are_normalised_and_sized():
    ds = _dataset()
    for name, gen in _generators(ds, size=24).items():
        views = gen(_batch(ds), 1)
        assert all(v.dtype == torch.float32 and v.shape[:2] == (len(ds), 3) for v in views), name
        assert views[0].shape[-1] == 24 and torch.isfinite(torch.stack([v.mean() for v in views])).all()
        assert views[0].min() < 0, "views are normalised, not in [0,1]"


def test_full_attention_view_is_the_light_augmented_image():
    ds = _dataset()
    aug, light = simclr_augment(32), light_augment(None)
    gen = AttentionViews(aug, light, NORM, mode="full")
    torch.manual_seed(3); views = gen(_batch(ds))
    x = to_float(_batch(ds)["image"])
    torch.manual_seed(3); v1, _ = aug(x); v2, _ = light(x)
    assert torch.equal(views[0], NORM(v1)) and torch.equal(views[1], NORM(v2))
    # a soft map that is constant everywhere (m = 1) gives exactly the same views
    ones = MapCache(); ones._set(torch.ones(len(ds), 1, 8, 8), torch.arange(len(ds)))
    soft = AttentionViews(aug, light, NORM, ones, mode="soft")
    torch.manual_seed(3); views_soft = soft(_batch(ds))
    assert all(torch.equal(a, b) for a, b in zip(views, views_soft))
    assert soft.diagnostics()["kept"] == pytest.approx(1.0)


def test_soft_view_multiplies_in_pixel_space():
    ds = _dataset()
    gen = AttentionViews(_no_colour(32), light_augment(None, p_flip=0.0, p_jitter=0.0, p_gray=0.0), NORM, _gt_cache(ds),
                         s=1.0)
    v = NORM.inverse(gen(_batch(ds))[1])
    x, m = to_float(ds.images), ds.masks.float()
    assert torch.allclose(v, x * m, atol=1e-5)              # s=1 on a binary map: m is the mask itself
    assert gen.diagnostics()["kept"] == pytest.approx(m.mean().item(), abs=1e-5)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_hard_mask_fill_values(fill):
    ds = _dataset()
    identity = light_augment(None, p_flip=0.0, p_jitter=0.0, p_gray=0.0)
    gen = AttentionViews(_no_colour(32), identity, NORM, _gt_cache(ds), mode="hard", fill=fill,
                         fill_value=(0.1, 0.2, 0.3) if fill == "mean" else None)
    v = NORM.inverse(gen(_batch(ds))[1])
    x, m = to_float(ds.images), ds.masks.float()
    bg = torch.zeros(1, 3, 1, 1) if fill == "zero" else torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(v, x * m + (1 - m) * bg, atol=1e-5)


def test_build_views_hard_mean_uses_dataset_mean():
    ds = _dataset()
    gen = build_views("attention", ds, source="ground_truth", mode="hard", fill="mean")
    assert torch.allclose(gen.fill_value.flatten(), torch.tensor(MEAN))


def test_attention_crop_and_resize():
    ds = _dataset(size=32)
    gen = AttentionViews(simclr_augment(16), light_augment(16), NORM, _gt_cache(ds), crop=(0.5, 1.0), size=16)
    views = gen(_batch(ds))
    assert views[1].shape == (len(ds), 3, 16, 16)
    with pytest.raises(ConfigError, match="crop"): AttentionViews(simclr_augment(16), light_augment(), NORM, mode="full", crop=(0, 2))


def test_heatmap_boxes_and_beta_centres():
    a = torch.full((2, 1, 32, 32), 0.05)
    a[0, 0, 4:10, 10:20] = 1.0                              # hot region rows 4..9, cols 10..19
    a[1, 0, 20:32, 0:6] = 3.0
    boxes = heatmap_boxes(a, k=0.1)
    assert torch.allclose(boxes[0], torch.tensor([10, 4, 20, 10]) / 32)
    assert torch.allclose(boxes[1], torch.tensor([0, 20, 6, 32]) / 32)
    assert torch.equal(heatmap_boxes(a, k=0.01), torch.tensor([[0.0, 0, 1, 1]] * 2))   # threshold below background
    # the box contains the hot region for any k
    for k in (0.1, 0.5, 1.0):
        b = heatmap_boxes(a, k)[0] * 32
        assert b[0] <= 10 and b[1] <= 4 and b[2] >= 20 and b[3] >= 10
    # crop centres follow the box: small crops are centred inside it
    torch.manual_seed(0)
    box = torch.tensor([[10.0, 4, 20, 10]]).repeat(2000, 1)
    crops = beta_centred_boxes(box, 32, 32, scale=(0.01, 0.02), alpha=0.6)
    cx, cy = (crops[:, 0] + crops[:, 2]) / 2, (crops[:, 1] + crops[:, 3]) / 2
    assert ((cx >= 10 - 1e-4) & (cx <= 20 + 1e-4) & (cy >= 4 - 1e-4) & (cy <= 10 + 1e-4)).all()
    assert abs(cx.mean().item() - 15) < 0.3 and abs(cy.mean().item() - 7) < 0.3
    # alpha < 1 puts more mass near the box's edges than a uniform draw would
    edge = ((cx - 15).abs() > 4).float().mean().item()
    assert edge > 0.2 + 0.05
    # large crops stay inside the image
    big = beta_centred_boxes(box, 32, 32, scale=(0.5, 1.0))
    assert (big[:, :2] >= -1e-4).all() and (big[:, 2:] <= 32 + 1e-4).all()


def test_degenerate_heatmaps_give_whole_image():
    a = torch.stack([torch.full((1, 8, 8), float("nan")), torch.zeros(1, 8, 8), torch.full((1, 8, 8), 2.0)])
    assert torch.equal(heatmap_boxes(a), torch.tensor([[0.0, 0, 1, 1]] * 3))
    with pytest.raises(ConfigError, match="k="): heatmap_boxes(a, k=0)


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__(); self.conv = nn.Conv2d(3, 4, 3, 2, 1)
    def forward(self, x, return_map=False):
        f = self.conv(x).relu()
        return (f.mean((2, 3)), f) if return_map else f.mean((2, 3))


def test_contrastive_crop_refresh_schedule_and_warmup():
    "The trainer hands the generator the encoder being trained and the training set, nothing else."
    ds = _dataset()
    cc = ContrastiveCropViews(light_augment(24), NORM, len(ds), 24, k=0.9, warmup_epochs=2, refresh_every=3, batch_size=4)
    encoder = _TinyCNN()
    refreshed = []
    for epoch in range(8):
        before = cc.refreshed_at
        cc.on_epoch_start(epoch, encoder=encoder, dataset=ds)
        if cc.refreshed_at != before: refreshed.append(epoch)
        views = cc(_batch(ds), epoch)
        assert len(views) == 2 and views[0].shape == (len(ds), 3, 24, 24)
    assert refreshed == [2, 5]
    assert not torch.equal(cc.boxes, torch.tensor([[0.0, 0, 1, 1]]).repeat(len(ds), 1))
    with pytest.raises(TypeError): cc.on_epoch_start(5, encoder)         # keywords only: no trainer in the slot
    fresh = ContrastiveCropViews(light_augment(24), NORM, len(ds), 24, warmup_epochs=0, batch_size=4)
    with pytest.raises(ConfigError, match="encoder="): fresh.on_epoch_start(0, dataset=ds)   # no encoder, no source


def test_schedules_and_attention_views_forward_the_encoder_and_dataset():
    "IntervalViews hands on_epoch_start's encoder and dataset to the active generator; AttentionViews refreshes over the dataset."
    ds = _dataset()
    cc = ContrastiveCropViews(light_augment(24), NORM, len(ds), 24, k=0.9, warmup_epochs=0, refresh_every=None, batch_size=4)
    iv = IntervalViews(TwoCropViews(simclr_augment(24), NORM), cc, warmup_epochs=1)
    iv.on_epoch_start(0, encoder=_TinyCNN(), dataset=ds)
    assert cc.refreshed_at is None                                      # epoch 0: the base generator
    iv.on_epoch_start(1, encoder=_TinyCNN(), dataset=ds)
    assert cc.refreshed_at == 1 and not torch.equal(cc.boxes, torch.tensor([[0.0, 0, 1, 1]]).repeat(len(ds), 1))
    cache = MapCache(GroundTruthSource(), refresh_every=2, batch_size=4).build(ds)
    cache.dataset = None                                                # as after a resume: the dataset comes from the trainer
    att = AttentionViews(simclr_augment(32), light_augment(), NORM, cache)
    att.on_epoch_start(1, dataset=ds); assert cache.builds == 1
    att.on_epoch_start(2, dataset=ds); assert cache.builds == 2 and cache.epoch == 2


def test_contrastive_crop_boxes_from_ground_truth_contain_object():
    ds = _dataset()
    cc = ContrastiveCropViews(light_augment(24), NORM, len(ds), 24, warmup_epochs=0, source=GroundTruthSource(),
                              dataset=ds, batch_size=4)
    cc.on_epoch_start(0)
    m = ds.masks[:, 0].bool()
    for i in range(len(ds)):
        ys, xs = torch.nonzero(m[i], as_tuple=True)
        x0, y0, x1, y1 = (cc.boxes[i] * 32).tolist()
        assert (x0, y0, x1, y1) == (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)


def test_interval_schedule_picks_generator():
    ds = _dataset()
    base, att = TwoCropViews(simclr_augment(32), NORM), AttentionViews(simclr_augment(32), light_augment(), NORM, mode="full")
    iv = IntervalViews(base, att, warmup_epochs=2, every=3)
    assert [iv.uses_views(e) for e in range(9)] == [False, False, True, False, False, True, False, False, True]
    assert [IntervalViews(base, att, warmup_epochs=3).uses_views(e) for e in range(5)] == [False] * 3 + [True] * 2
    for e in (1, 2):
        iv.on_epoch_start(e)
        iv(_batch(ds), e)
        d = iv.diagnostics()
        assert d["attention_epoch"] == float(e == 2) and (("kept" in d) == (e == 2))
    built = build_views("attention", ds, mode="full", warmup_epochs=2, every=2)
    assert isinstance(built, IntervalViews) and built.warmup_epochs == 2 and built.every == 2
    with pytest.raises(ConfigError): IntervalViews(base, MultiCropViews(simclr_augment(32), simclr_augment(16), NORM), 1)


def test_state_dict_round_trip(tmp_path):
    ds = _dataset()
    src = build_views("attention", ds, source="ground_truth", warmup_epochs=1)
    cc = ContrastiveCropViews(light_augment(24), NORM, len(ds), 24, warmup_epochs=0, source=GroundTruthSource(),
                              dataset=ds, batch_size=4)
    cc.on_epoch_start(0)
    for gen, fresh in [(src, build_views("attention", ds, cache=MapCache(), warmup_epochs=1)),
                       (cc, ContrastiveCropViews(light_augment(24), NORM, len(ds), 24, warmup_epochs=0))]:
        atomic_torch_save({"views": gen.state_dict()}, tmp_path/"last.pt")
        fresh.load_state_dict(torch.load(tmp_path/"last.pt", weights_only=False)["views"])
        torch.manual_seed(1); a = gen(_batch(ds), 3)
        torch.manual_seed(1); b = fresh(_batch(ds), 3)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert fresh.refreshed_at == 0
    with pytest.raises(ConfigError, match="boxes"):
        ContrastiveCropViews(light_augment(24), NORM, 3, 24).load_state_dict(cc.state_dict())


def test_registry_builds_every_generator_and_rejects_bad_names():
    ds = _dataset()
    for name in VIEWS:
        kw = {"attention": {"source": "ground_truth"}, "composition": {"ops": ["crop"]}}.get(name, {})
        gen = build_views(name, ds, **kw)
        gen.on_epoch_start(0)
        views = gen(_batch(ds), 0)
        assert len(views) == gen.num_views
    assert build_views("multi_crop", ds, n_local=3).num_views == 5
    assert build_views("two_crop", ds, augment="byol").augs[0] is not build_views("two_crop", ds, augment="byol").augs[1]
    with pytest.raises(ConfigError, match="two_crop"): build_views("random_crop", ds)
    with pytest.raises(ConfigError, match="mode"): build_views("attention", ds, modee="soft")
    with pytest.raises(ConfigError, match="valid modes"): build_views("attention", ds, source="ground_truth", mode="medium")
    with pytest.raises(ConfigError, match="valid fills"): build_views("attention", ds, source="ground_truth", fill="blue")
    with pytest.raises(ConfigError, match="needs a map cache"): build_views("attention", ds)
    with pytest.raises(ConfigError, match="augment"): build_views("two_crop", ds, augment="moco")


def test_degenerate_input_is_counted_not_fatal():
    ds = _dataset(size=16)
    # images smaller than the crop: upsampled and counted
    gen = build_views("attention", ds, size=32, source="ground_truth")
    gen.on_epoch_start(0)
    views = gen(_batch(ds))
    assert views[0].shape[-1] == views[1].shape[-1] == 32 and gen.diagnostics()["upsampled_count"] == 2 * len(ds)
    # NaN, zero and constant maps fall back to the whole image; hard masks keeping everything are counted
    maps = torch.rand(len(ds), 1, 4, 4)
    maps[0] = float("nan"); maps[1] = 0.0; maps[2] = 1.0
    cache = MapCache(); cache._set(maps, torch.arange(len(ds)))
    for mode in ("soft", "hard"):
        gen = AttentionViews(simclr_augment(16), light_augment(), NORM, cache, mode=mode)
        views = gen(_batch(ds))
        assert all(torch.isfinite(v).all() for v in views)
        d = gen.diagnostics()
        assert d["fallback_count"] == 3 and 0 < d["kept"] <= 1
        if mode == "hard": assert d["full_mask_count"] >= 3
    # masks that keep the whole image
    full = _dataset(size=16); full.masks.fill_(1)
    gen = AttentionViews(simclr_augment(16), light_augment(), NORM, _gt_cache(full), mode="hard")
    gen(_batch(full))
    assert gen.diagnostics()["full_mask_count"] == len(full) and gen.diagnostics()["kept"] == 1.0


def test_mask_diagnostics_report_object_share():
    ds = _dataset()
    gen = TwoCropViews(simclr_augment(32, scale=(0.05, 0.1)), NORM)
    torch.manual_seed(0)
    for _ in range(5): gen(_batch(ds))
    d = gen.diagnostics()
    assert 0 < d["missed_view0"] < 1 and 0 <= d["fg_view0"] <= 1
    gen.on_epoch_start(1)
    assert gen.diagnostics() == {}
    no_masks = TensorDataset(ds.images, ds.labels, None, mean=MEAN, std=STD)
    gen(no_masks.get_batch(torch.arange(4)))
    assert "fg_view0" not in gen.diagnostics()


def _write_image_folder(root, classes=("cat", "dog"), n=4, seed=0):
    "The official ImageFolder layout: one subfolder of PNGs per class (sizes and modes vary, as real folders do)."
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            h, w = 24 + 4 * i, 20 + 2 * k
            img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8); img[6:16, 6:14, k] = 230
            Image.fromarray(img).save(root / c / f"{i}.png")


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_lazy_folder_views(tmp_path, lazy):
    "Every view generator builds and runs on an image folder, decoded lazily (LazyImageFolder) or eagerly."
    from attnssl.attention import FeatureNormSource
    from attnssl.datasets import get_dataset, make_loader
    from attnssl.models import build_backbone
    _write_image_folder(tmp_path / "train")
    ds = get_dataset("imagefolder", "train", root=tmp_path, image_size=16, lazy=lazy)
    assert type(ds).__name__ == ("LazyImageFolder" if lazy else "ImageFolder") and ds.image_size == (16, 16)
    torch.manual_seed(0)
    heat = FeatureNormSource(build_backbone("resnet18", width=2, stem="small"))     # no masks here: a CNN heatmap
    gens = {"two_crop": build_views("two_crop", ds),
            "multi_crop": build_views("multi_crop", ds, n_local=2, local_size=8),
            "attention": build_views("attention", ds, source=heat, batch_size=4),
            "attention_hard_crop": build_views("attention", ds, source=heat, batch_size=4, mode="hard", crop=(0.5, 1.0)),
            "contrastive_crop": build_views("contrastive_crop", ds, source=heat, warmup_epochs=0, batch_size=4)}
    gens["contrastive_crop"].on_epoch_start(0)                    # boxes from the heatmaps of every image
    batch = next(iter(make_loader(ds, 4, seed=0)))
    for name, g in gens.items():
        views = g(batch, 0)
        assert len(views) == g.num_views == len(g.view_roles()), name
        assert views[0].shape == (4, 3, 16, 16) and all(torch.isfinite(v).all() for v in views), name
    with pytest.raises(ConfigError, match="needs masks"):         # the oracle needs masks, which a folder has not
        build_views("attention", ds, source="ground_truth")


def test_build_views_names_the_fix_for_a_source_that_needs_a_dataset():
    with pytest.raises(ConfigError, match=r"'vit' needs model="):
        build_views("attention", _dataset(), source="vit")
    with pytest.raises(ConfigError, match=r"'feature_norm' needs encoder="):
        build_views("contrastive_crop", _dataset(), source="feature_norm")


def test_composition_views_one_branch_only():
    "SimCLR's study: view 0 is the image itself, view 1 gets the ops in order; masks follow view 1's geometry."
    from attnssl.augment import Composition, to_float
    ds = _dataset(size=16)
    b = _batch(ds)
    gen = build_views("composition", ds, ops=["crop", "colour"])
    assert isinstance(gen.augs[1], Composition) and gen.augs[1].ops == ("crop", "colour") and gen.augs[0].ops == ()
    torch.manual_seed(0)
    (v0, v1), (m0, m1) = gen.generate(b)
    assert torch.allclose(gen.normalize.inverse(v0), to_float(b["image"]), atol=1e-5)
    assert torch.equal(m0, b["mask"].float()) and m1.shape == m0.shape and not torch.equal(m1, m0)
    assert gen.view_roles() == ("augmented", "augmented")

def test_composition_views_pixel_ops_keep_the_mask_and_validate():
    ds = _dataset(size=16)
    b = _batch(ds)
    (_, v1), (m0, m1) = build_views("composition", ds, ops=["noise", "cutout"]).generate(b)
    assert torch.equal(m1, m0)                                   # no geometry: the object stays where it was
    with pytest.raises(ConfigError, match="ops="): build_views("composition", ds)
    with pytest.raises(ConfigError, match="valid ops"): build_views("composition", ds, ops=["crop", "jpeg"])
    with pytest.raises(ConfigError, match="composition option"): build_views("composition", ds, ops=["crop"], mode="soft")

def test_composition_views_train_one_step_from_a_config(tmp_path):
    "A run config with views {'name': 'composition', 'ops': [...]} trains (the config path of template S1)."
    from attnssl import experiments as ex
    cfg = ex.make_config(num_images=32, num_test_images=16, width=2, batch_size=16, linear=False,
                         views={"name": "composition", "ops": ["crop", "colour"]})
    res = ex.run_pretrain(cfg, root=tmp_path)
    assert res["knn_top1"] >= 0 and res["config"]["views"] == {"name": "composition", "ops": ["crop", "colour"]}
