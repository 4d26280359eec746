"""Feature augmentation: each operator's distribution / invariants (beside a naive reference), the wrapper on
SimCLR, MoCo, BYOL and SimSiam (the method's own loss untouched), which tensors each stop-gradient variant
trains, M samples (mean vs free loss), the support queue, and the config section (inactive = old cache keys)."""
import pytest, torch
import torch.nn.functional as F
from attnssl.core import ConfigError
from attnssl.feature_aug import (FA_ARCHS, FA_OPERATORS, FA_STOP_GRADS, augment_features, fa_extrapolate, fa_mask,
                                 fa_mixup, fa_nearest, fa_noise, fa_section, with_feature_aug)
from attnssl.losses import nearest_neighbour
from attnssl.methods import build_method
from attnssl.models import build_backbone

torch.set_num_threads(1)
METHODS = ("simclr", "moco_v2", "byol", "simsiam")
ARCHS = {m: FA_ARCHS if m in ("byol", "simsiam") else ("basic", "parallel") for m in METHODS}
gen = lambda s=0: torch.Generator().manual_seed(s)
Z = torch.randn(512, 16, generator=gen(9)) * 2.5

def fresh(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_method(name, build_backbone("resnet18", width=2), **({"queue_size": 16} if "moco" in name else {}), **kw)

VIEWS = [torch.randn(6, 3, 16, 16, generator=gen(s)) for s in (1, 2)]

# ------------------------------------------------------------------------------------------------ operators
def test_feature_aug_nearest_is_the_ranked_neighbour_at_the_feature_norm():
    support = torch.randn(40, 16, generator=gen(1))
    nb0, _ = nearest_neighbour(Z, support)
    assert torch.allclose(fa_nearest(Z, support), nb0 * Z.norm(dim=1, keepdim=True), atol=1e-5)
    for rank in (1, 3):
        got = fa_nearest(Z[:20], support, rank)
        for b in range(20):   # naive: sort the support by cosine, take position `rank`
            cos = [float(F.cosine_similarity(Z[b], s, dim=0)) for s in support]
            want = F.normalize(support[sorted(range(40), key=lambda k: -cos[k])[rank]], dim=0) * Z[b].norm()
            assert torch.allclose(got[b], want, atol=1e-5)
    z = Z[:8].clone().requires_grad_()
    (fa_nearest(z, support) * torch.arange(16.)).sum().backward()
    assert torch.equal(z.grad, torch.arange(16.).expand(8, 16))   # straight through: the gradient of z itself
    with pytest.raises(ConfigError, match="queue_size"): fa_nearest(Z, support[:2], rank=2)

def test_feature_aug_mask_drops_p_and_keeps_the_mean():
    m = fa_mask(Z, 0.3, gen())
    dropped = m == 0
    assert abs(float(dropped.float().mean()) - 0.3) < 0.02
    assert torch.allclose(m[~dropped], Z[~dropped] / 0.7)
    mean = torch.stack([fa_mask(Z[:4], 0.3, gen(s)) for s in range(3000)]).mean(0)
    assert torch.allclose(mean, Z[:4], atol=0.15)
    assert torch.equal(fa_mask(Z, 0.0, gen()), Z)
    with pytest.raises(ConfigError): fa_mask(Z, 1.0)

def test_feature_aug_noise_is_gaussian_scaled_to_the_norm():
    eps = fa_noise(Z, 0.5, gen()) - Z
    assert abs(float((eps.norm(dim=1) / Z.norm(dim=1)).mean()) - 0.5) < 0.03
    unit = eps / (0.5 * Z.norm(dim=1, keepdim=True) / 4)      # back to N(0, I): sqrt(D) = 4
    assert abs(float(unit.mean())) < 0.02 and abs(float(unit.std()) - 1) < 0.02
    assert torch.allclose(fa_noise(3 * Z, 0.5, gen()), 3 * fa_noise(Z, 0.5, gen()), atol=1e-5)   # scale-free
    assert torch.equal(fa_noise(Z, 0.0, gen()), Z)

def test_feature_aug_mixup_matches_a_naive_reference():
    out = fa_mixup(Z, 0.8, gen(3))
    g = gen(3); lam = 0.8 + 0.2 * torch.rand(len(Z), 1, generator=g); perm = torch.randperm(len(Z), generator=g)
    for b in range(len(Z)):
        assert torch.allclose(out[b], lam[b] * Z[b] + (1 - lam[b]) * Z[perm[b]], atol=1e-6)
    assert float(lam.min()) >= 0.8 and torch.allclose(fa_mixup(Z, 1.0, gen()), Z)

def test_feature_aug_extrapolate_moves_away_from_the_other_view():
    other = Z + torch.randn_like(Z)
    d = fa_extrapolate(Z, other, 0.5, gen()) - Z
    lam = (d * (Z - other)).sum(1) / (Z - other).pow(2).sum(1)
    assert torch.allclose(d, lam[:, None] * (Z - other), atol=1e-5)   # along z - other
    assert float(lam.min()) >= 0 and float(lam.max()) <= 0.5 and float(lam.max()) > 0.45

def test_feature_aug_operators_keep_shape_and_name_errors():
    for op in FA_OPERATORS:
        a = augment_features(op, Z, other=Z.flip(0), support=Z[:32], generator=gen())
        assert a.shape == Z.shape and torch.isfinite(a).all()
    with pytest.raises(ConfigError, match="valid operators"): augment_features("cutout", Z)
    with pytest.raises(ConfigError, match="support"): augment_features("nn", Z)
    with pytest.raises(ConfigError, match="other"): augment_features("extrapolate", Z)
    with pytest.raises(ConfigError, match="2-D|batch, dim"): augment_features("mask", Z[0])

# ------------------------------------------------------------------------------------------------ the wrapper
@pytest.mark.parametrize("name", METHODS)
def test_feature_aug_wrapper_on_every_method(name):
    plain = fresh(name); torch.manual_seed(5); want = plain(VIEWS)["loss"]
    for arch in ARCHS[name]:
        for op in FA_OPERATORS:
            w = with_feature_aug(fresh(name), op=op, arch=arch, samples=2, queue_size=8, weight=0.5)
            torch.manual_seed(5); out = w(VIEWS)
            assert torch.equal(out["loss_method"], want.detach())          # the method's own loss, to the bit
            assert torch.allclose(out["loss"], out["loss_method"] + 0.5 * out["fa"])
            out["loss"].backward(); w.on_step_end(0, 10)
            assert w.method.backbone.stem[0].weight.grad is not None
    with pytest.raises(ConfigError, match="no predictor" if name in ("simclr", "moco_v2") else "valid values"):
        with_feature_aug(fresh(name), arch="predictor" if name in ("simclr", "moco_v2") else "serial")

def test_feature_aug_needs_the_loss_hook_and_valid_options():
    with pytest.raises(ConfigError, match="loss_inputs"): with_feature_aug(fresh("nnclr"))
    for bad in ({"op": "blur"}, {"stop_grad": "target"}, {"loss": "sum"}, {"samples": 0}, {"weight": -1}, {"archh": "basic"}):
        with pytest.raises(ConfigError): with_feature_aug(fresh("simclr"), **bad)

def grads(name, stop_grad, arch):
    "Which tensors the FA term alone trains, on one (online 0, target 1) pair."
    w = with_feature_aug(fresh(name), op="noise", arch=arch, stop_grad=stop_grad)
    li = {**w.method.loss_inputs(VIEWS), "pairs": ((0, 1),)}
    z, t = li["proj"][0], li["target"][1]
    for x in (z, t):
        if x.requires_grad: x.retain_grad()
    term = w.fa_term(li, generator=gen())
    if term.requires_grad: term.backward()           # basic + sg on z~ with a no-grad target: nothing to train
    got = lambda x: x.grad is not None and bool(x.grad.abs().sum() > 0)
    params = lambda m: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())
    return {"z": got(z), "target": t.requires_grad and got(t),
            "fa_predictor": w.fa_predictor is not None and params(w.fa_predictor),
            "predictor": hasattr(w.method, "predictor") and params(w.method.predictor),
            "projector": params(w.method.projector)}

@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("stop_grad", FA_STOP_GRADS)
def test_feature_aug_gradient_flow(name, stop_grad):
    "Exactly which tensors receive gradient from the FA term in each stop-gradient variant and architecture."
    target_has_grad = name == "simclr"   # MoCo keys, BYOL's EMA target, SimSiam's sg(z) carry no gradient
    for arch in ARCHS[name]:
        g = grads(name, stop_grad, arch)
        through_aug = stop_grad in ("none", "orig")
        through_target = target_has_grad and stop_grad in ("none", "aug")
        assert g["z"] == through_aug, (arch, g)
        assert g["target"] == through_target, (arch, g)
        assert g["projector"] == (through_aug or through_target), (arch, g)
        assert g["fa_predictor"] == (arch == "parallel"), (arch, g)          # trained even when z~ is detached
        # the method's predictor: always in predictor-FA (z~ enters it), in basic only through p~ = A(p) undetached
        assert g["predictor"] == (arch == "predictor" or (arch == "basic" and through_aug and name in ("byol", "simsiam"))), (arch, g)

def test_feature_aug_samples_mean_vs_free_loss():
    for op in ("noise", "nn"):
        terms = {}
        for loss in ("mean", "free"):
            w = with_feature_aug(fresh("byol"), op=op, samples=3, loss=loss, queue_size=8)
            terms[loss] = w.fa_term(w.method.loss_inputs(VIEWS), generator=gen())
        assert torch.allclose(terms["free"], 3 * terms["mean"])
    one = with_feature_aug(fresh("byol"), op="noise", samples=1)
    three = with_feature_aug(fresh("byol"), op="noise", samples=3)
    a, b = (m.fa_term(m.method.loss_inputs(VIEWS), generator=gen()) for m in (one, three))
    assert not torch.allclose(a, b)                     # the 3 samples are different draws

def test_feature_aug_support_queue_takes_the_step_features():
    w = with_feature_aug(fresh("simclr"), op="nn", queue_size=8)
    before = w.support.clone()
    out = w(VIEWS); out["loss"].backward(); w.on_step_end(0, 1)
    assert torch.allclose(w.support[:6], F.normalize(out["z"][0].detach(), dim=1), atol=1e-6)
    assert torch.equal(w.support[6:], before[6:]) and int(w.support_ptr) == 6
    w.eval(); w(VIEWS); w.on_step_end(1, 2)
    assert int(w.support_ptr) == 6                     # evaluation never writes the queue
    sd = w.state_dict(); w2 = with_feature_aug(fresh("simclr", seed=1), op="nn", queue_size=8); w2.load_state_dict(sd)
    assert torch.equal(w2.support, w.support)

# ------------------------------------------------------------------------------------------------ config
def test_feature_aug_inactive_section_keeps_existing_cache_keys():
    from attnssl import experiments as ex
    c = ex.make_config(method="byol", recipe="cpu", num_images=64, views={"name": "two_crop", "augment": "byol"})
    assert ex.config_key({}) == "4fc13f59f0f801ac" and ex.config_key(c) == "46a8c805b387bc77"   # keys before FA existed (CACHE_VERSION 4)
    for off in ({}, {"op": None}, {"op": "nn", "weight": 0}):
        assert ex.config_key(ex.override(c, {"feature_aug": off})) == "46a8c805b387bc77"
    on = ex.override(c, {"feature_aug.op": "mixup"})
    assert ex.config_key(on) != ex.config_key(c)
    assert ex.config_key(on) == ex.config_key(ex.override(on, {"feature_aug.strength": 0.8, "feature_aug.samples": 1}))
    assert ex.canonical_config(on)["feature_aug"] == fa_section({"op": "mixup"})
    with pytest.raises(ConfigError, match="feature_aug option"): ex.config_key(ex.override(c, {"feature_aug": {"op": "nn", "M": 2}}))

def test_feature_aug_tiny_run_through_pretrain(tmp_path):
    from attnssl import experiments as ex
    c = ex.make_config(method="simclr", recipe="cpu", num_images=32, num_test_images=16, width=2, batch_size=16,
                       linear=False, views={"name": "two_crop", "augment": "strong_asym"})
    c = ex.override(c, {"feature_aug": {"op": "nn", "samples": 2, "loss": "free", "queue_size": 16}, "runtime.device": "cpu"})
    res = ex.run_pretrain(c, root=tmp_path)
    assert res["config"]["feature_aug"]["loss"] == "free" and 0 <= res["knn_top1"] <= 100
    rows = ex.load_metrics(res)
    assert rows and rows[-1]["loss"] > rows[-1]["loss_method"]   # the FA term is in the trained loss
