"""Foreground masks (attnssl.foreground) and the pixel-level losses and methods (attnssl.pixel): each loss against a
naive loop in float64 (values and gradients), the degenerate masks, the masks following crops, HARL and HAPiCLR."""
import pytest
import torch

from attnssl.core import ConfigError
from attnssl.augment import simclr_augment
from attnssl.foreground import (FG_SOURCES, GroundTruthFgSource, build_fg_source, fg_in_boxes, fg_mask_iou, fg_masks,
                                sample_fg_params, with_fg_masks)
from attnssl.methods import METHODS, build_method
from attnssl.models import build_backbone
from attnssl.pixel import (HARL, PIXEL_VARIANTS, harl_loss, masked_avg_pool, pixel_contrast_loss, resize_fg,
                           view_masks, with_pixel)
from attnssl.synthetic import ClutterShapes

D64 = torch.float64

def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64).requires_grad_(True)

def grads(out, inputs):
    return [torch.zeros_like(x) if g is None else g
            for g, x in zip(torch.autograd.grad(out, inputs, allow_unused=True, retain_graph=True), inputs)]

def assert_same(a, b, inputs):
    assert torch.allclose(torch.as_tensor(a, dtype=D64), torch.as_tensor(b, dtype=D64), atol=1e-10), (float(a), float(b))
    for ga, gb in zip(grads(a, inputs), grads(b, inputs)): assert torch.allclose(ga, gb, atol=1e-10)

@pytest.fixture(scope="module")
def clutter():
    return ClutterShapes("test", num_images=48, image_size=32, seed=0)

# ---------------------------------------------------------------- foreground masks
@pytest.mark.parametrize("name", ["felzenszwalb", "saliency", "ground_truth"])
def test_fg_mask_sources_give_binary_masks_at_image_size(name, clutter):
    src = build_fg_source(name)
    b = clutter.get_batch(torch.arange(8))
    m = src(b["image"], b["mask"])
    assert m.dtype == torch.bool and m.shape == (8, 1, 32, 32)
    iou = fg_mask_iou(m, b["mask"])["iou"]
    assert (iou == 1.0) if name == "ground_truth" else 0.1 < iou < 1.0

def test_fg_mask_from_attention_and_feature_norm(clutter):
    from attnssl.attention import build_attention_source
    b = clutter.get_batch(torch.arange(4))
    for src in (build_fg_source("attention", source=build_attention_source("random_vit"), t=0.6),
                build_fg_source("feature_norm", encoder=build_backbone("resnet18", width=2), mean=clutter.mean, std=clutter.std)):
        m = src(b["image"])
        assert m.shape == (4, 1, 32, 32) and 0 < m.float().mean() < 1

def test_fg_mask_builder_errors():
    with pytest.raises(ConfigError, match="valid sources"): build_fg_source("dino")
    with pytest.raises(ConfigError, match="needs source="): build_fg_source("attention")
    with pytest.raises(ConfigError, match="needs encoder="): build_fg_source("feature_norm")
    with pytest.raises(ConfigError, match="needs masks"): GroundTruthFgSource()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert set(FG_SOURCES) >= {"felzenszwalb", "saliency", "ground_truth"}

def test_fg_mask_cache_replaces_dataset_masks(clutter):
    m = fg_masks(clutter, build_fg_source("saliency"), batch_size=16)
    ds = with_fg_masks(clutter, m)
    assert m.shape == (48, 1, 32, 32) and torch.equal(ds.get_batch(torch.tensor([5, 7]))["mask"], m[[5, 7]])
    assert torch.equal(ds.gt_masks, clutter.masks) and ds.mean == clutter.mean and ds.classes == clutter.classes

def test_fg_mask_redraw_is_bounded_and_counted(clutter):
    aug = simclr_augment(32, scale=(0.08, 0.2))
    masks = clutter.masks
    params, counts = sample_fg_params(aug, masks, min_fg=0.3, max_tries=3, generator=torch.Generator().manual_seed(0))
    share = fg_in_boxes(masks, params["boxes"])
    full = (params["boxes"] == torch.tensor([0.0, 0.0, 32.0, 32.0])).all(1)
    assert ((share >= 0.3) | full).all() and full.sum() >= counts["fallbacks"] > 0
    assert counts["redraws"] <= 3 * len(masks)
    _, none = sample_fg_params(aug, torch.zeros(4, 1, 32, 32), min_fg=0.2, max_tries=2)   # no foreground at all
    assert none == {"redraws": 8, "fallbacks": 4}
    with pytest.raises(ConfigError): sample_fg_params(aug, masks, min_fg=1.5)

def test_fg_mask_follows_crop_and_flip():
    "The mask of a view is the view's pixels of the image's mask: a half-white image with its mask as the white half."
    img = torch.zeros(16, 3, 32, 32, dtype=torch.uint8); img[..., :, 16:] = 255
    mask = (img[:, :1] > 0).to(torch.uint8)
    from attnssl.views import TwoCropViews
    from attnssl.augment import Normalize
    g = TwoCropViews(simclr_augment(32, jitter=(0, 0, 0, 0), p_gray=0.0), Normalize((0, 0, 0), (1, 1, 1)), min_fg=0.2)
    batch = {"image": img, "mask": mask, "index": torch.arange(16)}
    views = g(batch)
    assert len(batch["view_masks"]) == 2
    for v, m in zip(views, batch["view_masks"]):
        assert ((v[:, :1] > 0.5) == (m > 0.5)).float().mean() > 0.97
    d = g.diagnostics()
    assert "fg_redraw_count" in d and "fg_fallback_count" in d

# ---------------------------------------------------------------- HARL loss
def ref_harl(p_g, z_g, p_fg, z_fg, p_bg, z_bg, vf, vb, alpha, beta):
    def d(p, z):
        z = z.detach(); return 2 - 2 * (p @ z) / (p.norm() * z.norm())
    g = sum(d(p_g[i], z_g[i]) for i in range(len(p_g))) / len(p_g)
    terms = []
    for p, z, v in ((p_fg, z_fg, vf), (p_bg, z_bg, vb)):
        ds = [d(p[i], z[i]) for i in range(len(p)) if v[i]]
        terms.append(sum(ds) / len(ds) if ds else torch.zeros((), dtype=D64))
    return beta * g + (1 - beta) * (alpha * terms[0] + (1 - alpha) * terms[1])

@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.3, 0.8), (1.0, 0.0)])
def test_harl_loss_matches_naive_loop(alpha, beta):
    args = [rnd(5, 7, seed=s) for s in range(6)]
    vf, vb = torch.tensor([1, 0, 1, 1, 0]).bool(), torch.tensor([1, 1, 0, 1, 1]).bool()
    assert_same(harl_loss(*args, vf, vb, alpha, beta), ref_harl(*args, vf, vb, alpha, beta), args)

def test_harl_degenerate_masks():
    "All foreground (no background anywhere), all background: the missing term is 0 with no gradient; the rest unchanged."
    args = [rnd(4, 6, seed=s) for s in range(6)]
    on, off = torch.ones(4).bool(), torch.zeros(4).bool()
    for vf, vb in ((on, off), (off, on), (off, off)):
        loss = harl_loss(*args, vf, vb)
        assert torch.isfinite(loss)
        assert_same(loss, ref_harl(*args, vf, vb, 0.5, 0.5), args)
    g = grads(harl_loss(*args, on, off), args)
    assert g[4].abs().max() == 0 and g[2].abs().max() > 0            # no background: p_bg gets nothing
    with pytest.raises(ConfigError): harl_loss(*args, on, on, alpha=2.0)

def test_harl_masked_pooling_and_resize():
    m = torch.zeros(3, 1, 32, 32); m[0, :, 8:24, 8:24] = 1; m[1] = 1; m[2, :, :3, :3] = 1
    r = resize_fg(m, (4, 4))
    assert r.dtype == torch.bool and r.flatten(1).sum(1).tolist() == [4, 16, 0]   # tiny object: empty after resize
    f = rnd(3, 5, 4, 4)
    ref = torch.stack([sum(f[b, :, i, j] * float(r[b, 0, i, j]) for i in range(4) for j in range(4)) / (r[b].sum() + 1) for b in range(3)])
    assert_same(masked_avg_pool(f, r).sum(), ref.sum(), [f])
    assert masked_avg_pool(f, r)[2].abs().max() == 0

def test_harl_method_registered_and_trains_a_step():
    assert METHODS["harl"] is HARL
    torch.manual_seed(0)
    m = build_method("harl", build_backbone("resnet18", width=2), alpha=0.5, beta=0.5)
    x = [torch.randn(6, 3, 32, 32) for _ in range(2)]
    vm = [torch.zeros(6, 1, 32, 32) for _ in range(2)]
    for v in vm: v[:, :, 4:20, 4:20] = 1
    vm[1][0] = 1; vm[0][1] = 0                                           # all foreground / all background views
    out = m(x, {"view_masks": vm}, roles=("augmented", "augmented"))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and float(out["fg_valid"]) == pytest.approx(5 / 6) and float(out["bg_valid"]) == pytest.approx(5 / 6)
    assert m.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="view_masks"): m(x, {}, roles=None)
    m.on_step_end(0, 10)

# ---------------------------------------------------------------- HAPiCLR pixel loss
def ref_pixel(p1, p2, f1, f2, tau, variant):
    def direction(pa, pb, fa, fb):
        imgs = []
        for b in range(len(pa)):
            qa = [v / v.norm() for v in pa[b].flatten(1).T]; qb = [v / v.norm() for v in pb[b].flatten(1).T]
            ra, rb = fa[b].flatten().tolist(), fb[b].flatten().tolist()
            ls = []
            for i in range(len(qa)):
                if variant == "fg" and not ra[i]: continue
                pos = [torch.exp(qa[i] @ qb[j] / tau) for j in range(len(qb)) if rb[j] == ra[i]]
                neg = [torch.exp(qa[i] @ qb[j] / tau) for j in range(len(qb)) if rb[j] != ra[i]]
                if pos and neg: ls.append(-torch.log(sum(pos) / (sum(pos) + sum(neg))))
            if ls: imgs.append(sum(ls) / len(ls))
        return sum(imgs) / len(imgs) if imgs else torch.zeros((), dtype=D64)
    return 0.5 * (direction(p1, p2, f1, f2) + direction(p2, p1, f2, f1))

@pytest.mark.parametrize("variant", PIXEL_VARIANTS)
@pytest.mark.parametrize("tau", [0.1, 0.2, 1.0])
def test_hapiclr_loss_matches_naive_loop(variant, tau):
    p1, p2 = rnd(3, 5, 3, 3, seed=1), rnd(3, 5, 2, 3, seed=2)          # the two views' maps may differ in size
    g = torch.Generator().manual_seed(3)
    f1, f2 = torch.rand(3, 1, 3, 3, generator=g) > 0.5, torch.rand(3, 1, 2, 3, generator=g) > 0.5
    f1[0, 0, 0, 0], f1[0, 0, 1, 1], f2[0, 0, 0, 0], f2[0, 0, 1, 1] = True, False, True, False
    assert_same(pixel_contrast_loss(p1, p2, f1, f2, tau, variant), ref_pixel(p1, p2, f1, f2, tau, variant), [p1, p2])

@pytest.mark.parametrize("variant", PIXEL_VARIANTS)
def test_hapiclr_degenerate_masks(variant):
    "All foreground, all background, empty after resize: no anchor, value 0, zero gradient; mixed batches skip those images."
    p1, p2 = rnd(2, 4, 2, 2, seed=4), rnd(2, 4, 2, 2, seed=5)
    ones, zeros = torch.ones(2, 1, 2, 2).bool(), torch.zeros(2, 1, 2, 2).bool()
    tiny = resize_fg(torch.zeros(2, 1, 16, 16).index_fill_(2, torch.tensor([0]), 1.0), (2, 2))   # a 1-px line: empty
    for f1, f2 in ((ones, ones), (zeros, zeros), (tiny, tiny), (ones, zeros)):
        loss = pixel_contrast_loss(p1, p2, f1, f2, 0.2, variant)
        assert loss.item() == 0 and all(g.abs().max() == 0 for g in grads(loss, [p1, p2]))
    mixed = torch.tensor([[[[1, 0], [0, 0]]], [[[1, 1], [1, 1]]]]).bool()
    full = pixel_contrast_loss(p1, p2, mixed, mixed, 0.2, variant)
    first = pixel_contrast_loss(p1[:1], p2[:1], mixed[:1], mixed[:1], 0.2, variant)
    assert torch.allclose(full, first)                                  # the all-foreground image is skipped
    with pytest.raises(ConfigError): pixel_contrast_loss(p1, p2, mixed, mixed, 0.2, "bg-only")
    with pytest.raises(ConfigError): pixel_contrast_loss(p1, p2, mixed[:, :, :1], mixed, 0.2, variant)

@pytest.mark.parametrize("name,kw", [("simclr", {}), ("moco_v2", {"queue_size": 32}), ("byol", {})])
def test_hapiclr_wrapper_keeps_the_method_loss_and_runs_the_backbone_once(name, kw):
    x = [torch.randn(6, 3, 32, 32) for _ in range(2)]
    vm = [torch.zeros(6, 1, 32, 32) for _ in range(2)]
    for v in vm: v[:, :, 8:24, 8:24] = 1
    torch.manual_seed(0); plain = build_method(name, build_backbone("resnet18", width=2), **kw)
    torch.manual_seed(0); wrapped = with_pixel(build_method(name, build_backbone("resnet18", width=2), **kw), weight=0.5)
    calls = []
    wrapped.method.backbone.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(1); ref = plain(x, {"view_masks": vm}, roles=None)["loss"]
    torch.manual_seed(1); out = wrapped(x, {"view_masks": vm}, roles=None)
    assert torch.allclose(out["loss_method"], ref.detach()) and len(calls) == 2
    assert torch.allclose(out["loss"].detach(), out["loss_method"] + 0.5 * out["pixel"])
    out["loss"].backward()
    assert wrapped.head[0].weight.grad.abs().sum() > 0 and wrapped.backbone is wrapped.method.backbone
    assert wrapped.name == f"{name}+hapiclr" and wrapped.export_backbone() is wrapped.method.backbone
    wrapped.on_step_end(0, 4)

def test_hapiclr_one_directional_target_reencodes_the_target_view():
    "With target_view set, the online backbone sees one view; the other's map is computed with return_map=True."
    x = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    vm = [torch.ones(4, 1, 32, 32) for _ in range(2)]
    for v in vm: v[:, :, :16] = 0
    w = with_pixel(build_method("byol", build_backbone("resnet18", width=2), target_view="attention"))
    out = w(x, {"view_masks": vm}, roles=("augmented", "attention"))
    assert torch.isfinite(out["loss"]) and out["pixel"] > 0
    with pytest.raises(ConfigError, match="view_masks"): w(x, {"view_masks": [vm[0], None]}, roles=("augmented", "attention"))
    with pytest.raises(ConfigError): with_pixel(build_method("simclr", build_backbone("resnet18", width=2)), variant="x")
