"""attention: CLS attention read-out, post-processing, mass threshold, degenerate maps, sources, MapCache."""
import math
import pytest
import torch
import torch.nn as nn
import timm

from attnssl.core import ConfigError, atomic_torch_save
from attnssl.attention import (
    AttentionSource, ViTAttentionSource, FeatureNormSource, GroundTruthSource, MapCache, attention_rollout,
    best_mass_threshold, build_attention_source, cls_attention, hard_mask, load_vit, map_diagnostics, map_entropy, mask_iou,
    mass_threshold, postprocess, sanitize_maps, save_vit_checkpoint, unfused_attention)


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(pretrained=False, img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3, num_classes=0,
               dynamic_img_size=True)
    return timm.create_model("vit_tiny_patch16_224", **{**cfg, **kw}).eval()


class ToyData(torch.utils.data.Dataset):
    "The data contract's batch dict with masks: a bright square (the object) on dark noise."
    has_masks, mean, std = True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self, n=12, size=32):
        g = torch.Generator().manual_seed(0)
        self.masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
        for i in range(n):
            r, c = torch.randint(0, size - 12, (2,), generator=g).tolist()
            self.masks[i, :, r:r + 12, c:c + 12] = 1
        self.images = (torch.rand(n, 3, size, size, generator=g) * 60 + self.masks * 150).to(torch.uint8)

    def __len__(self): return len(self.images)
    def __getitem__(self, i):
        return {"image": self.images[i], "index": i, "label": -1, "mask": self.masks[i]}
    def get_batch(self, idx):
        return {"image": self.images[idx], "index": idx, "label": -torch.ones_like(idx), "mask": self.masks[idx]}


def _block_input(vit, x, block):
    feats = {}
    h = vit.blocks[block].norm1.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    with torch.no_grad(): vit.forward_features(x)
    h.remove()
    return feats["x"]


@pytest.mark.parametrize("block", [0, -1])
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_cls_attention_matches_manual_softmax(block, reg_tokens):
    vit = tiny_vit(reg_tokens=reg_tokens)
    x = torch.randn(3, 3, 32, 40)                        # non-square: dynamic size, 8x10 grid
    rows = cls_attention(vit, x, block)
    n = vit.num_prefix_tokens + 8 * 10
    assert rows.shape == (3, 3, n)
    assert torch.allclose(rows.sum(-1), torch.ones(3, 3), atol=1e-5)
    attn = vit.blocks[block].attn
    q, k, _ = attn.qkv(_block_input(vit, x, block)).reshape(3, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    manual = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)[:, :, 0, :]
    assert torch.allclose(rows, manual, atol=1e-5)
    # the source's map is the patch part of that row, heads averaged / maxed, on the patch grid
    src = ViTAttentionSource(vit, block=block)
    p = vit.num_prefix_tokens
    assert torch.allclose(src.maps(x), manual[..., p:].mean(1).reshape(3, 1, 8, 10), atol=1e-5)
    assert torch.allclose(ViTAttentionSource(vit, block=block, heads="max").maps(x),
                          manual[..., p:].amax(1).reshape(3, 1, 8, 10), atol=1e-5)
    assert torch.allclose(ViTAttentionSource(vit, block=block, heads=1).maps(x),
                          manual[:, 1:2, p:].reshape(3, 1, 8, 10), atol=1e-5)


def test_fused_flag_restored_and_only_read_block_unfused():
    vit = tiny_vit()
    for blk in vit.blocks: blk.attn.fused_attn = True
    seen = []
    h = vit.blocks[0].attn.register_forward_pre_hook(lambda m, i: seen.append([b.attn.fused_attn for b in vit.blocks]))
    cls_attention(vit, torch.randn(1, 3, 32, 32), block=-1)
    h.remove()
    assert seen == [[True, False]]                     # during the read only the read block is unfused
    assert all(b.attn.fused_attn for b in vit.blocks)
    # after an exception inside the forward pass
    def boom(m, i, o): raise RuntimeError("boom")
    h = vit.blocks[1].mlp.register_forward_hook(boom)
    h2 = vit.blocks[0].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        cls_attention(vit, torch.randn(1, 3, 32, 32), block=-1)
    h.remove(); h2.remove()
    assert all(b.attn.fused_attn for b in vit.blocks)
    assert all(len(b.attn.attn_drop._forward_hooks) == 0 for b in vit.blocks)  # hooks removed too
    with pytest.raises(ValueError):
        with unfused_attention([vit.blocks[0].attn]): raise ValueError
    assert vit.blocks[0].attn.fused_attn
    # fused output unchanged by the read (it is the same model afterwards)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): before = vit.forward_features(x)
    cls_attention(vit, x)
    with torch.no_grad(): assert torch.allclose(vit.forward_features(x), before)


def test_rollout_is_a_distribution_and_single_block_case():
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    r = attention_rollout(vit, x, block=-1)
    assert r.shape == (2, 65) and torch.allclose(r.sum(-1), torch.ones(2), atol=1e-5)
    r0 = attention_rollout(vit, x, block=0, residual=0.0)  # one block, no residual: the head-mean attention
    assert torch.allclose(r0, cls_attention(vit, x, 0).mean(1), atol=1e-5)
    assert ViTAttentionSource(vit, rollout=True).maps(x).shape == (2, 1, 8, 8)


def test_source_restores_training_flags_and_accepts_backbone_with_vit():
    vit = tiny_vit().train()
    vit.blocks[0].eval()
    wrapper = nn.Module(); wrapper.vit = vit
    src = ViTAttentionSource(wrapper)
    src.maps(torch.randn(1, 3, 32, 32))
    assert vit.training and not vit.blocks[0].training and vit.blocks[1].training


def test_bad_inputs_raise_config_error():
    vit = tiny_vit()
    with pytest.raises(ConfigError, match="block"): ViTAttentionSource(vit, block=5)
    with pytest.raises(ConfigError, match="heads"): ViTAttentionSource(vit, heads="median")
    with pytest.raises(ConfigError, match="VisionTransformer"): ViTAttentionSource(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="normalised float"): ViTAttentionSource(vit).maps(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="masks"): GroundTruthSource().maps(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="mass threshold"): mass_threshold(torch.rand(1, 1, 4, 4), 0.0)
    with pytest.raises(ConfigError): postprocess(torch.rand(1, 1, 4, 4), s=0)
    with pytest.raises(ConfigError, match="valid"): build_attention_source("nope")
    with pytest.raises(ConfigError, match="valid"): build_attention_source("ground_truth", gird=4)
    with pytest.raises(ConfigError, match="refresh_every"): MapCache(refresh_every=0)
    with pytest.raises(ConfigError, match="build"): MapCache().get([0])


def test_postprocess_formula():
    torch.manual_seed(0)
    raw = torch.rand(4, 1, 5, 5) * 0.02
    for s, gamma, beta in [(1, 1, 0), (2, 1, 0), (4, 0.5, 0.1), (8, 2, 0.3)]:
        m = postprocess(raw, s=s, gamma=gamma, beta=beta)
        ref = torch.empty_like(raw)
        for i in range(4):                               # naive per-image reference
            a1 = raw[i] / raw[i].max()
            ref[i] = beta + (1 - beta) * torch.clamp(s * a1, 0, 1) ** gamma
        assert torch.allclose(m, ref, atol=1e-6)
        assert torch.allclose(postprocess(raw, None, s, gamma, beta), ref, atol=1e-6)
        assert m.min() >= beta - 1e-6 and m.max() <= 1 + 1e-6
    up = postprocess(raw, size=20)
    assert up.shape == (4, 1, 20, 20) and torch.allclose(up.flatten(1).amax(1), torch.ones(4))


def _brute_force_min_size(vals, t):
    "Smallest number of entries whose sum reaches t * total (take the largest first)."
    v = sorted(vals, reverse=True); total, c = sum(v), 0.0
    for n, x in enumerate(v, 1):
        c += x
        if c >= t * total: return n


@pytest.mark.parametrize("t", [0.1, 0.5, 0.6, 0.9, 1.0])
def test_mass_threshold_keeps_t_and_is_minimal(t):
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(6, 1, 7, 9, generator=g, dtype=torch.float64) ** 3    # distinct values
    maps[0, 0, :3] = 0                                                        # some zeros
    keep = mass_threshold(maps, t)
    for a, k in zip(maps, keep):
        a, k = a.flatten(), k.flatten()
        kept = a[k]
        assert kept.sum() >= t * a.sum() - 1e-12                               # at least t of the mass
        assert kept.sum() - kept.min() < t * a.sum()                            # minimal: dropping the smallest fails
        assert k.sum() == _brute_force_min_size(a.tolist(), t)
        assert (a[~k] <= kept.min()).all()                                      # it is a top set
    assert mass_threshold(maps[:1], 1.0).sum() == (maps[0] > 0).sum()           # t=1 keeps all positive mass


def test_mass_threshold_ties():
    a = torch.tensor([[4.0, 1.0, 1.0], [1.0, 1.0, 1.0]])[None, None]        # total 9
    assert mass_threshold(a, 0.4).sum() == 1                                   # 4/9 = 0.44 >= 0.4
    assert mass_threshold(a, 0.5).sum() == 6                                   # needs a 1: all tied 1s come in
    binary = torch.zeros(2, 1, 16, 16); binary[:, :, 4:9, 3:12] = 1
    assert torch.equal(mass_threshold(binary, 0.6), binary.bool())
    assert mass_threshold(torch.full((1, 1, 4, 4), 0.3), 0.6).all()          # uniform: whole image


def test_best_mass_threshold_picks_the_grid_point_with_the_best_mean_iou():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(5, 1, 16, 16)
    for i in range(5): r, c = torch.randint(0, 8, (2,), generator=g); masks[i, :, r:r + 6, c:c + 6] = 1
    maps = masks + 0.05 * torch.rand(5, 1, 16, 16, generator=g)      # right place, some background mass
    t_best, ious = best_mass_threshold(maps, masks, grid=(0.3, 0.6, 0.9))
    naive = {t: sum(mask_iou(hard_mask(maps[i:i + 1], t, 16), masks[i:i + 1]).item() for i in range(5)) / 5 for t in (0.3, 0.6, 0.9)}
    assert ious.keys() == naive.keys() and all(abs(ious[t] - naive[t]) < 1e-6 for t in naive)
    assert ious[t_best] == max(naive.values())
    with pytest.raises(ConfigError, match="one mask per map"): best_mass_threshold(maps, masks[:3])


def test_degenerate_maps_fall_back_to_whole_image_and_are_counted():
    ok = torch.rand(1, 1, 4, 4) + 0.1
    cases = {"zero": torch.zeros(1, 1, 4, 4), "negative": -torch.rand(1, 1, 4, 4),
             "nan": torch.full((1, 1, 4, 4), float("nan")), "inf": ok.clone().index_put_((torch.tensor([0]),) * 4, torch.tensor(float("inf"))),
             "constant": torch.full((1, 1, 4, 4), 0.7)}
    maps = torch.cat([ok, *cases.values()])
    clean, counts = sanitize_maps(maps)
    assert counts == {"nonfinite": 2, "zero": 2, "constant": 1}
    assert torch.isfinite(clean).all() and torch.equal(clean[0], ok[0])
    m, c2 = postprocess(maps, size=8, return_counts=True)
    assert c2 == counts and torch.isfinite(m).all()
    assert torch.equal(m[1:], torch.ones_like(m[1:]))                          # every fallback keeps the whole image
    hm = hard_mask(maps, 0.6, size=8)
    assert hm[1:].all() and not hm[0].all()
    d = map_diagnostics(maps, size=8)
    assert (d["fallback_zero"], d["fallback_nonfinite"], d["fallback_constant"]) == (2, 2, 1)
    assert d["whole_image"] == pytest.approx(5 / 6) and math.isfinite(d["entropy"])
    assert torch.isfinite(map_entropy(maps)).all()
    # mixed: a map that is valid except for a negative entry keeps its shape (negative clipped to 0)
    mixed = ok.clone(); mixed[0, 0, 0, 0] = -1
    assert sanitize_maps(mixed)[1] == {"nonfinite": 0, "zero": 0, "constant": 0}


def test_mask_iou_and_entropy():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.bool); a[..., :2, :] = True
    b = torch.zeros_like(a); b[..., 1:3, :] = True
    assert mask_iou(a, b).item() == pytest.approx(1 / 3)
    assert mask_iou(torch.zeros_like(a), torch.zeros_like(a)).item() == 1.0
    assert map_entropy(torch.ones(1, 1, 4, 4)).item() == pytest.approx(1.0)
    one_hot = torch.zeros(1, 1, 4, 4); one_hot[..., 0, 0] = 1
    assert map_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_oracle_iou_is_one_and_feature_norm():
    data = ToyData()
    cache = MapCache(batch_size=5).build(data, build_attention_source("ground_truth"))
    d = cache.diagnostics()
    assert d["iou"] == 1.0 and d["n"] == len(data)
    fmap_src = FeatureNormSource(_TinyCNN().train())
    m = fmap_src.maps(torch.randn(2, 3, 32, 32))
    assert m.shape == (2, 1, 16, 16) and (m >= 0).all()
    assert fmap_src.module.training and fmap_src.module.bn.num_batches_tracked == 0
    ref = fmap_src.module.eval()(torch.randn(1, 3, 32, 32), return_map=True)[1]
    assert FeatureNormSource(fmap_src.module, reduce="mean").maps(torch.randn(1, 3, 32, 32)).shape == (1, 1, 16, 16)
    assert ref.shape[1] == 8
    with pytest.raises(ConfigError, match="needs masks"):
        class NoMasks(ToyData): has_masks = False
        MapCache().build(NoMasks(), GroundTruthSource())


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__(); self.conv = nn.Conv2d(3, 8, 3, 2, 1); self.bn = nn.BatchNorm2d(8)
    def forward(self, x, return_map=False):
        f = torch.relu(self.bn(self.conv(x)))
        return (f.mean((2, 3)), f) if return_map else f.mean((2, 3))


def test_map_cache_get_order_and_checkpoint_round_trip(tmp_path):
    data = ToyData()
    src = ViTAttentionSource(tiny_vit())
    cache = MapCache(batch_size=5).build(data, src)
    assert cache.maps.shape == (12, 1, 8, 8)
    x = (data.images.float() / 255 - 0.5) / 0.25
    direct = src.maps(x)
    idx = torch.tensor([7, 0, 11, 7])
    assert torch.allclose(cache.get(idx), direct[idx], atol=1e-6)
    atomic_torch_save({"views": cache.state_dict()}, tmp_path / "last.pt")
    restored = MapCache()
    restored.load_state_dict(torch.load(tmp_path / "last.pt")["views"])
    assert torch.equal(restored.get(idx), cache.get(idx))
    assert restored.epoch == 0 and restored.builds == 1 and restored.counts == cache.counts
    with pytest.raises(ConfigError, match="not in the map cache"): cache.get([12])
    # dataset without get_batch goes through __getitem__
    class ItemOnly(ToyData): get_batch = None
    del ItemOnly.get_batch
    assert torch.allclose(MapCache(batch_size=5).build(ItemOnly(), src).get(idx), cache.get(idx))


def test_map_cache_refresh_schedule_and_resume(tmp_path):
    data = ToyData(n=4)
    vit = tiny_vit()
    cache = MapCache(ViTAttentionSource(vit), refresh_every=3, batch_size=4).build(data)
    before = cache.get([0, 1]).clone()
    refreshed = []
    for epoch in range(1, 8):
        if epoch == 2:
            with torch.no_grad(): vit.blocks[-1].attn.qkv.weight.mul_(3)   # the source keeps training
        if cache.maybe_refresh(epoch): refreshed.append(epoch)
        if epoch == 4:                                                        # checkpoint + resume mid-run
            atomic_torch_save(cache.state_dict(), tmp_path / "c.pt")
            resumed = MapCache(ViTAttentionSource(vit), refresh_every=3)
            resumed.load_state_dict(torch.load(tmp_path / "c.pt"))
            assert not resumed.maybe_refresh(5, data) and resumed.maybe_refresh(6, data)
    assert refreshed == [3, 6] and cache.builds == 3 and cache.epoch == 6
    assert not torch.allclose(cache.get([0, 1]), before)
    never = MapCache(ViTAttentionSource(vit)).build(data)
    assert not any(never.maybe_refresh(e) for e in range(10))


def test_pretrained_from_local_checkpoint(tmp_path):
    vit = tiny_vit(seed=3)
    save_vit_checkpoint(vit, tmp_path / "vit.pt", model_name="vit_tiny_patch16_224", img_size=32, patch_size=4,
                        depth=2, embed_dim=48, num_heads=3)
    src = build_attention_source("pretrained", checkpoint=tmp_path / "vit.pt")
    assert src.outside_pretraining and src.describe()["outside_pretraining"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(src.maps(x), ViTAttentionSource(vit).maps(x), atol=1e-6)
    # bare state dict with a wrapper prefix, plus model_name
    torch.save({f"module.{k}": v for k, v in vit.state_dict().items()}, tmp_path / "bare.pt")
    vit2 = load_vit(tmp_path / "bare.pt", model_name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2,
                    embed_dim=48, num_heads=3)
    assert torch.allclose(ViTAttentionSource(vit2).maps(x), src.maps(x), atol=1e-6)
    with pytest.raises(ConfigError, match="model_name"): load_vit(tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match="does not exist"): load_vit(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        load_vit(tmp_path / "vit.pt", embed_dim=96)
    # input_size resizes before the ViT: a 16x16 grid
    assert ViTAttentionSource(vit, input_size=64).maps(x).shape == (2, 1, 16, 16)


def test_factory_names():
    vit = tiny_vit()
    assert isinstance(build_attention_source("vit", model=vit, heads="max"), ViTAttentionSource)
    assert isinstance(build_attention_source("feature_norm", encoder=_TinyCNN()), FeatureNormSource)
    assert isinstance(build_attention_source("oracle", grid=8), GroundTruthSource)
    src = build_attention_source("random_vit", backbone_kwargs=dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3))
    assert src.maps(torch.randn(1, 3, 32, 32)).shape == (1, 1, 8, 8) and not src.outside_pretraining


def test_minmax_normalisation_option():
    raw = torch.tensor([[1.0, 1.05], [1.1, 1.2]])[None, None]
    assert torch.equal(postprocess(raw), torch.ones_like(raw))                   # a/max with s=2 saturates a flat map
    m = postprocess(raw, s=1, norm="minmax")
    assert torch.allclose(m.flatten(), torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert torch.equal(postprocess(torch.full((1, 1, 2, 2), 3.0), norm="minmax"), torch.ones(1, 1, 2, 2))
    assert torch.allclose(postprocess(raw, None, 1, 1, 0, norm="minmax"), m)
    assert map_diagnostics(raw, norm="minmax")["kept"] < map_diagnostics(raw)["kept"]
    with pytest.raises(ConfigError, match="minmax"): postprocess(raw, norm="median")


def test_sources_that_need_an_input_say_which():
    "A name alone cannot build 'vit' (needs the model) and the like: a ConfigError names the option."
    from attnssl.views import build_views
    with pytest.raises(ConfigError, match=r"needs encoder="): build_attention_source("feature_norm")
    with pytest.raises(ConfigError, match=r"needs model="): build_attention_source("vit")
    with pytest.raises(ConfigError, match=r"build_attention_source\('vit', model=\.\.\.\)"):
        build_views("attention", ToyData(n=4), source="vit")
    # no name trains a ViT: that is a run, and the error says which one
    with pytest.raises(ConfigError, match=r"unknown attention source 'dino_vit'.*experiments\.attention_source_of"):
        build_attention_source("dino_vit", dataset=ToyData(n=4))


def _write_image_folder(root, classes=("cat", "dog"), n=6, size=32, seed=0):
    "The official ImageFolder layout: one subfolder of PNGs per class."
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            img[8:24, 8:24, k] = 230                                    # a coloured square: the "object"
            Image.fromarray(img).save(root / c / f"{i}.png")


def test_e0_template_runs_on_a_dataset_without_masks(tmp_path, monkeypatch):
    "E0 on an image folder (no object masks): IoU reads 'n/a (no masks)', no oracle / centre-prior rows."
    import papermill as pm
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for split in ("train", "test"): _write_image_folder(tmp_path/"data"/split, seed=len(split))
    monkeypatch.setenv("ATTNSSL_RUNS", str(tmp_path/"runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path/"E0"; out.mkdir()
    params = dict(out_dir=str(out), dataset="imagefolder", data_root=str(tmp_path/"data"), batch_size=6, device="cpu",
                  vit_configs=[["vit_tiny", 8, 2]], vit_epochs_list=[1], iou_images=8, n_show=2, knn_k=5)
    params["num_val_images"] = 2     # the template's val split, carved from 12 training images
    pm.execute_notebook(str(root/"nbs"/"experiments"/"E0_vit_configuration.ipynb"), str(out/"E0.ipynb"),
                        parameters=params, kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    table = (out/"E0_vit_attention.md").read_text()
    assert "n/a (no masks)" in table and "oracle" not in table and "centre prior" not in table
    assert (out/"E0_attention_maps.png").exists()
