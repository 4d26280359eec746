"""Pretext tasks and PIRL: each builds its labels / targets from the views (rotations, puzzle orders, holes, bank
entries) as documented; the Hamming selection; PIRL's mixed loss against a naive loop (values and gradients);
every method trains through the trainer and through `experiments.run_pretrain` by name."""
import itertools, math
import pytest
import torch
import torch.nn.functional as F

import attnssl
from attnssl.core import ConfigError
from attnssl.methods import METHODS, MemoryBank, build_method
from attnssl.models import build_backbone
from attnssl.pretext import (ContextEncoder, Jigsaw, PIRL, RotNet, hamming_permutations, jigsaw_tiles, masked_mse,
                             min_hamming_distance, pirl_loss, region_mask, rotation_batch)

ROLES = ("augmented", "augmented")
SMALL = {"rotnet": {}, "jigsaw": {"num_permutations": 10}, "context_encoder": {},
         "pirl": {"num_samples": 16, "num_negatives": 8, "num_permutations": 10}}


def _views(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


def _method(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_method(name, build_backbone("resnet18", width=2, stem="small"), **{**SMALL[name], **kw})


def test_pretext_methods_are_registered_by_name():
    for name, cls in [("rotnet", RotNet), ("jigsaw", Jigsaw), ("context_encoder", ContextEncoder), ("pirl", PIRL)]:
        assert METHODS[name] is cls and cls.name == name


# --- RotNet ---------------------------------------------------------------------------------------------------
def test_rotnet_labels_all_rotations():
    x = torch.randn(3, 2, 5, 5)
    xr, y = rotation_batch(x)
    assert y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        for i in range(3):   # naive: rotate one image by k * 90 degrees counter-clockwise, element by element
            ref = x[i].clone()
            for _ in range(k): ref = torch.stack([c.T.flip(0) for c in ref])
            assert torch.equal(xr[3 * k + i], ref)


def test_rotnet_labels_one_random_rotation():
    x = torch.randn(64, 1, 4, 4)
    xr, y = rotation_batch(x, all_rotations=False, generator=torch.Generator().manual_seed(0))
    assert xr.shape == x.shape and set(y.tolist()) == {0, 1, 2, 3}
    assert all(torch.equal(torch.rot90(xr[i], -int(y[i]), dims=(1, 2)), x[i]) for i in range(64))


def test_rotnet_rejects_non_square_views():
    with pytest.raises(ConfigError, match="square"): rotation_batch(torch.zeros(2, 3, 4, 5))


def test_rotnet_loss_is_cross_entropy_of_the_rotation_labels():
    m = _method("rotnet").eval()
    v = _views()
    out = m(v, {}, roles=ROLES)
    x, y = rotation_batch(torch.cat(v))
    assert torch.allclose(out["loss"], F.cross_entropy(m.head(m.backbone(x)), y), atol=1e-6)
    assert torch.allclose(out["h0"], m.backbone(v[0]), atol=1e-5)     # h0: the unrotated first view
    assert 0 <= float(out["pretext_acc"]) <= 1


# --- Jigsaw ---------------------------------------------------------------------------------------------------
def test_jigsaw_hamming_selection_is_greedy_max_min():
    perms = hamming_permutations(12, num_tiles=5, seed=3)
    every = torch.tensor(list(itertools.permutations(range(5))))
    assert len({tuple(p) for p in perms.tolist()}) == 12
    for i in range(1, 12):   # naive: each pick has the largest minimum distance to the earlier picks
        dist = lambda p: min(int((p != q).sum()) for q in perms[:i])
        assert dist(perms[i]) == max(dist(p) for p in every if not any(torch.equal(p, q) for q in perms[:i]))
    assert torch.equal(perms, hamming_permutations(12, num_tiles=5, seed=3))


def test_jigsaw_hamming_set_is_farther_apart_than_random():
    perms = hamming_permutations(30)
    rand = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(i)) for i in range(30)])
    assert min_hamming_distance(perms) > min_hamming_distance(rand)
    with pytest.raises(ConfigError, match="permutations"): hamming_permutations(0)
    with pytest.raises(ConfigError, match="3x3"): hamming_permutations(5, num_tiles=16)


@pytest.mark.parametrize("gap", [0, 2])
def test_jigsaw_tiles_follow_the_permutation_of_their_label(gap):
    grid, size = 3, 32
    cell = size // grid
    perms = hamming_permutations(10)
    labels = torch.tensor([0, 3, 9, 3, 1])
    tiles = jigsaw_tiles(torch.zeros(5, 2, size, size), perms, labels, grid, gap)
    assert tiles.shape == (5, 9, 2, cell - gap, cell - gap)
    # with a grid origin at 0..2, each tile must come from inside its cell: use an image constant per cell for every origin
    for oy in range(size - grid * cell + 1):
        img = torch.zeros(size, size)
        for c in range(9):
            img[(c // 3) * cell:(c // 3 + 1) * cell, (c % 3) * cell:(c % 3 + 1) * cell] = c
        x = img.expand(5, 2, size, size)
        t = jigsaw_tiles(x, perms, labels, grid, gap, generator=torch.Generator().manual_seed(oy))
        shown = t.flatten(2)
        ok = (shown == shown[..., :1]).all(-1)                 # a tile inside one cell is constant
        if ok.all():
            assert torch.equal(shown[..., 0].long(), perms[labels])
    with pytest.raises(ConfigError, match="tiles"): jigsaw_tiles(torch.zeros(1, 3, 4, 4), perms, labels[:1], 3, 0)


def test_jigsaw_tiles_naive_reference():
    "Against a loop that cuts the cells one by one at the same random origin and offsets (gap 0, origin drawn first)."
    perms = hamming_permutations(10)
    x = torch.randn(3, 3, 31, 31)
    labels = torch.tensor([2, 0, 7])
    g = torch.Generator().manual_seed(5)
    tiles = jigsaw_tiles(x, perms, labels, generator=g)
    g = torch.Generator().manual_seed(5)
    oy, ox = torch.randint(2, (3, 1), generator=g), torch.randint(2, (3, 1), generator=g)
    for i in range(3):
        for j in range(9):
            c = int(perms[labels[i], j]); top, left = int(oy[i]) + (c // 3) * 10, int(ox[i]) + (c % 3) * 10
            assert torch.equal(tiles[i, j], x[i, :, top:top + 10, left:left + 10])


def test_jigsaw_loss_is_cross_entropy_over_the_permutation_set():
    m = _method("jigsaw").eval()
    v = _views()
    torch.manual_seed(7); out = m(v, {}, roles=ROLES)
    torch.manual_seed(7)
    x = torch.cat(v); y = torch.randint(10, (len(x),))
    logits = m.head(m.tiles(m.backbone, jigsaw_tiles(x, m.perms, y)))
    assert torch.allclose(out["loss"], F.cross_entropy(logits, y), atol=1e-5)
    assert m.perms.shape == (10, 9) and not any(p is m.backbone for p in m.tiles.children())


# --- context encoder ------------------------------------------------------------------------------------------
def test_context_encoder_masks_are_squares_of_the_asked_size():
    m = region_mask(50, 32, frac=0.5, generator=torch.Generator().manual_seed(0))
    assert m.shape == (50, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
    for k in m[:, 0]:
        r, c = k.nonzero().T
        assert (r.max() - r.min() + 1, c.max() - c.min() + 1) == (16, 16) and k.sum() == 256
    assert len({tuple(k.nonzero()[0].tolist()) for k in m[:, 0]}) > 1          # random positions
    c = region_mask(2, 32, frac=0.5, shape="center")
    assert c[:, 0, 8:24, 8:24].all() and c.sum() == 2 * 256
    with pytest.raises(ConfigError, match="mask"): region_mask(1, 32, shape="ring")
    with pytest.raises(ConfigError, match="mask_frac"): region_mask(1, 32, frac=1.0)


def test_context_encoder_target_is_the_hidden_region_only():
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = region_mask(2, 8, 0.5, "center")
    naive = sum(float((pred[b, c, i, j] - target[b, c, i, j]) ** 2) for b in range(2) for c in range(3)
                for i in range(8) for j in range(8) if mask[b, 0, i, j]) / (2 * 3 * 16)
    assert math.isclose(float(masked_mse(pred, target, mask)), naive, rel_tol=1e-5)
    pred2 = pred.clone(); pred2[mask.expand_as(pred) == 0] = 100.0               # outside the hole: no effect
    assert torch.allclose(masked_mse(pred2, target, mask), masked_mse(pred, target, mask))


def test_context_encoder_encoder_never_sees_the_hole():
    m = _method("context_encoder", mask_shape="center").eval()
    v = _views()
    out = m(v, {}, roles=ROLES)
    v2 = [x.clone() for x in v]
    for x in v2: x[..., 8:24, 8:24] = 123.0                                      # change only the hidden pixels
    hidden = lambda views: m.backbone(torch.cat(views) * (1 - region_mask(8, 32, 0.5, "center")))
    assert torch.allclose(hidden(v), hidden(v2))
    assert torch.allclose(out["h0"], m.backbone(v[0] * (1 - region_mask(4, 32, 0.5, "center"))), atol=1e-5)
    assert m.decoder(torch.zeros(1, m.feat_dim, 4, 4), (32, 32)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("stem,steps", [("small", 3), ("imagenet", 5)])
def test_context_encoder_decoder_matches_the_backbone_stride(stem, steps):
    torch.manual_seed(0)
    m = build_method("context_encoder", build_backbone("resnet18", width=2, stem=stem))
    assert sum(isinstance(l, torch.nn.Upsample) for l in m.decoder.net) == steps
    out = m(_views(2, 64), {}, roles=ROLES); out["loss"].backward()


# --- PIRL -----------------------------------------------------------------------------------------------------
def _naive_pirl(f, g, index, bank, tau, lam, neg):
    total = 0.
    for b in range(len(f)):
        for q, w in ((g[b], lam), (f[b], 1 - lam)):
            keys = [bank[index[b]]] + [bank[k] for k in neg[b]]
            s = torch.stack([torch.dot(q / q.norm(), k / k.norm()) / tau for k in keys])
            total = total + w * -(s[0] - torch.logsumexp(s, 0))
    return total / len(f)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9])
def test_pirl_loss_matches_naive_loop(lam):
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(12, 5, generator=gen)
    f, g = (torch.randn(3, 5, generator=gen, requires_grad=True) for _ in range(2))
    index, neg = torch.tensor([1, 4, 11]), torch.randint(12, (3, 6), generator=gen)
    got, ref = pirl_loss(f, g, index, bank, 0.1, lam=lam, negatives=neg), _naive_pirl(f, g, index, bank, 0.1, lam, neg)
    assert torch.allclose(got, ref, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (f, g)), torch.autograd.grad(ref, (f, g))):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ConfigError, match="lam"): pirl_loss(f, g, index, bank, lam=1.5)


def test_pirl_targets_are_bank_entries_of_the_image_and_bank_holds_f():
    m = _method("pirl")
    assert isinstance(m, MemoryBank) and m.perms.shape == (10, 9)
    v, index = _views(), torch.tensor([3, 0, 15, 7])
    before = m.bank.clone()
    torch.manual_seed(2); out = m(v, {"index": index}, roles=ROLES)
    f, g = out["z"]
    assert f.shape == g.shape == (4, 128)
    # the loss: pirl_loss of (f, g) against bank[index] with the method's negatives
    torch.manual_seed(2); jigsaw_tiles(v[1], m.perms, torch.randint(10, (4,)))     # the puzzle's draws come first
    from attnssl.losses import sample_negatives
    neg = sample_negatives(index, 16, 8)
    assert torch.allclose(out["loss"], pirl_loss(f, g, index, before, m.temperature, lam=0.5, negatives=neg), atol=1e-5)
    out["loss"].backward(); m.on_step_end(0, 1)
    changed = (m.bank != before).any(1)
    assert changed[index].all() and changed.sum() == 4
    ref = F.normalize(0.5 * before[index] + 0.5 * F.normalize(f.detach(), dim=1), dim=1)   # momentum 0.5 towards f(v_I)
    assert torch.allclose(m.bank[index], ref, atol=1e-5)
    with pytest.raises(ConfigError, match="index"): m(v, {}, roles=ROLES)
    with pytest.raises(ConfigError, match="num_samples"): build_method("pirl", build_backbone("resnet18", width=2))


# --- training through the trainer and the run cache -------------------------------------------------------------
@pytest.mark.parametrize("name", list(SMALL))
def test_pretext_methods_train_by_name_through_run_pretrain(name, tmp_path):
    from attnssl.experiments import make_config, run_pretrain
    kw = {k: v for k, v in SMALL[name].items() if k != "num_samples"}     # pretrain sets the bank size
    cfg = make_config(method=name, method_kw=kw, num_images=32, num_test_images=16, epochs=1, batch_size=16,
                      width=2, linear=False, device="cpu")
    res = run_pretrain(cfg, root=tmp_path)
    assert res["config"]["method"]["name"] == name and 0 <= res["knn_top1"] <= 100


# --- per-stage linear probes (template T1) -----------------------------------------------------------------------
def test_linear_stages_leave_existing_cache_keys_unchanged():
    from attnssl.experiments import config_key, make_config, override
    base = make_config(method="simclr", num_images=64)
    assert config_key({}) == "4fc13f59f0f801ac" and config_key(base) == "03400e1c716df7fd"   # keys before linear_stages existed (CACHE_VERSION 4)
    assert config_key(override(base, {"eval.linear_stages": []})) == config_key(base)
    assert config_key(override(base, {"eval.linear_stages": [1, 2, 3, 4]})) != config_key(base)


def test_stage_encoder_probes_each_stage(tmp_path):
    from attnssl.evaluate import StageEncoder
    from attnssl.experiments import make_config, override, run_grid
    bb = build_backbone("resnet18", width=2, stem="small").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(StageEncoder(bb, 4)(x), bb(x), atol=1e-6)
        assert [StageEncoder(bb, k)(x).shape[1] for k in (1, 2, 3, 4)] == [2, 4, 8, 16]
    with pytest.raises(ConfigError, match="stage"): StageEncoder(bb, 5)
    cfg = override(make_config(method="rotnet", num_images=32, num_test_images=16, epochs=1, batch_size=16, width=2,
                               linear_epochs=1, device="cpu"), {"eval.linear_stages": [2, 4]})
    row = run_grid(cfg, {"rotnet": {}}, seeds=1, root=tmp_path, log=None)[0]
    assert {"linear_top1_stage2", "linear_top1_stage4"} <= set(row) and "linear_top1_stage1" not in row


def test_t1_small_sizes_do_not_leak_into_larger_profiles():
    "small's T1 section is inherited by profiles that extend it: each resets the sizes to its own defaults."
    from attnssl.cli import profile_parameters
    small, medium, paper, dry = (profile_parameters(p)["T1"] for p in ("small", "medium", "paper", "paper-dry-run"))
    assert small["epochs"] == 8 and small["seeds"] == 3
    assert medium["epochs"] == profile_parameters("medium")["E2"]["epochs"] and medium["num_images"] == 4096
    assert paper["epochs"] == 500 and paper["num_images"] is None and paper["linear_epochs"] == 100
    assert dry["epochs"] == 1 and dry["seeds"] == 1 and dry["num_images"] is None


def test_a_redefined_method_class_replaces_itself():
    "Re-running a notebook cell that defines and registers a method (same class name) is no name clash."
    from attnssl.methods import register_method
    again = type("RotNet", (RotNet,), {})
    try:
        assert register_method("rotnet")(again) is again and METHODS["rotnet"] is again
        with pytest.raises(ConfigError, match="taken"): register_method("jigsaw")(again)
    finally: METHODS["rotnet"] = RotNet
