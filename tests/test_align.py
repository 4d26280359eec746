"""WithAlign: lam=0 reproduces the method, the target is a view role (not a position), stop-gradient on the
target side, symmetric gradient both ways, every two-view method trains with it, and it keeps the Method interface (attributes, checkpoints, trainer)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnssl.align import ALIGN_TARGETS, WithAlign, with_align
from attnssl.core import ConfigError
from attnssl.methods import build_method
from attnssl.models import build_backbone

METHODS = ["simclr", "moco_v2", "byol", "simsiam"]
SMALL = {"simclr": {}, "moco_v2": {"queue_size": 64}, "byol": {}, "simsiam": {}}


def _method(name, seed=0):
    torch.manual_seed(seed)
    return build_method(name, build_backbone("resnet18", width=4, stem="small"), **SMALL[name])


ROLES = ("augmented", "attention")          # the attention views' roles


def _views(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)], {"index": torch.arange(n)}


class _Linear(nn.Module):
    "A stand-in method whose own loss is zero: the gradient of WithAlign's loss is the align term's alone."
    name, num_views = "linear", 2
    def __init__(self):
        super().__init__(); self.backbone = nn.Linear(12, 6)
    def forward(self, views, batch=None, roles=None):
        z = [self.backbone(v.flatten(1)) for v in views]
        return {"loss": 0.0 * (z[0].sum() + z[1].sum()), "z": z, "h0": z[0].detach(), "p_pos": torch.tensor(0.75)}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("target", list(ALIGN_TARGETS))
def test_lam_zero_reproduces_the_method(name, target):
    m = _method(name)
    views, batch = _views()
    torch.manual_seed(1); ref = m(views, batch, roles=ROLES)          # the method's own (symmetric) loss
    torch.manual_seed(1); out = WithAlign(m, lam=0.0, target=target)(views, batch, roles=ROLES)
    assert torch.equal(out["loss"], ref["loss"])
    assert torch.equal(out["loss_method"], ref["loss"].detach())
    for k in ("p_pos", "s_pos", "s_neg"):
        assert torch.equal(torch.as_tensor(out[k]), torch.as_tensor(ref[k]), ) or (
            torch.isnan(torch.as_tensor(out[k])) and torch.isnan(torch.as_tensor(ref[k])))


def test_align_term_value_and_weight():
    m = _Linear()
    views, batch = _views(size=2)
    out = WithAlign(m, lam=2.5)(views, batch, roles=ROLES)
    z = m(views)["z"]
    ref = (2 - 2 * F.cosine_similarity(z[0], z[1])).mean()
    assert torch.allclose(out["align"], ref, atol=1e-6) and torch.allclose(out["loss"], 2.5 * ref, atol=1e-5)
    assert out["grad_share"] == pytest.approx(0.25)


@pytest.mark.parametrize("target,grad_aug,grad_att", [("attention", True, False), ("augmented", False, True),
                                                     ("symmetric", True, True)])
@pytest.mark.parametrize("roles", [ROLES, ROLES[::-1]])
def test_stop_gradient_on_the_target_side(target, grad_aug, grad_att, roles):
    "The roles decide which view is the target, wherever it sits in the list."
    views, batch = _views(size=2)
    views = [v.requires_grad_(True) for v in views]
    WithAlign(_Linear(), lam=1.0, target=target)(views, batch, roles=roles)["loss"].backward()
    got = {r: bool(v.grad.abs().sum() > 0) for r, v in zip(roles, views)}
    assert got == {"augmented": grad_aug, "attention": grad_att}


def test_symmetric_gives_each_view_its_online_gradient():
    "No stop-gradient: each view gets exactly the gradient it would get as the online view of a one-sided align."
    m = _Linear()
    views, batch = _views(size=2)
    grads = {}
    for target in ALIGN_TARGETS:
        vs = [v.clone().requires_grad_(True) for v in views]
        WithAlign(m, target=target)(vs, batch, roles=ROLES)["loss"].backward()
        grads[target] = [v.grad for v in vs]
    assert torch.allclose(grads["symmetric"][0], grads["attention"][0], atol=1e-6)
    assert torch.allclose(grads["symmetric"][1], grads["augmented"][1], atol=1e-6)
    vs = [v.clone().requires_grad_(True) for v in views]
    z = m(vs)["z"]
    (2 - 2 * F.cosine_similarity(z[0], z[1])).mean().backward()               # the loss with no stop-gradient
    assert all(torch.allclose(a, v.grad, atol=1e-6) for a, v in zip(grads["symmetric"], vs))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_with_align(name):
    for target in ALIGN_TARGETS:
        m = with_align(_method(name), lam=1.0, target=target)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        views, batch = _views()
        out = m(views, batch, roles=ROLES)
        assert torch.isfinite(out["loss"]) and out["align"] >= 0 and {"p_pos", "s_pos", "s_neg", "h0"} <= set(out)
        opt.zero_grad(); out["loss"].backward()
        grads = [p.grad for p in m.backbone.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step(); m.on_step_end(1, 10)
        assert m.name == f"{name}+align" and m.num_views == 2


def test_interface_passthrough_and_checkpoint():
    base = _method("moco_v2")
    m = WithAlign(base, lam=0.5, target="augmented")
    assert m.backbone is base.backbone and m.queue is base.queue and m.feat_dim == base.feat_dim
    x = torch.randn(2, 3, 16, 16)
    base.eval(); assert torch.equal(m.encode(x), base.encode(x))
    fresh = WithAlign(_method("moco_v2", seed=5), lam=0.5, target="augmented")
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.method.queue, base.queue)
    assert "lam=0.5" in repr(m)


def test_bad_options_name_the_fix():
    with pytest.raises(ConfigError, match="attention, augmented, symmetric"): WithAlign(_Linear(), target="key")
    with pytest.raises(ConfigError, match="lam"): WithAlign(_Linear(), lam=-1)
    views, batch = _views(size=2)
    with pytest.raises(ConfigError, match="no roles were given"): WithAlign(_Linear())(views, batch)
    with pytest.raises(ConfigError, match="exactly one of the two views"):   # two random crops: no attention view
        WithAlign(_Linear())(views, batch, roles=("augmented", "augmented"))
    assert WithAlign(_Linear(), target="symmetric")(views, batch, roles=("augmented", "augmented"))["loss"].ndim == 0
    with pytest.raises(TypeError): WithAlign(_Linear())(views, batch, target=1)   # the index knob is gone


def test_trainer_runs_align_with_attention_views(tmp_path):
    from attnssl.attention import GroundTruthSource
    from attnssl.synthetic import ClutterShapes
    from attnssl.train import Trainer, TrainConfig
    from attnssl.views import build_views
    ds = ClutterShapes(num_images=64, image_size=16, seed=0)
    views = build_views("attention", ds, source=GroundTruthSource(), batch_size=64)
    method = with_align(_method("simclr"), lam=1.0)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu", online_probe=False, progress=False,
                      out_dir=str(tmp_path), precision="fp32")
    final = Trainer(method, views, ds, cfg).fit()
    import json
    rows = [json.loads(l) for l in (tmp_path/"metrics.jsonl").read_text().splitlines()]
    assert rows and {"loss", "loss_method", "align", "p_pos", "views/kept"} <= set(rows[-1])
    assert rows[-1]["loss"] > rows[-1]["loss_method"]              # loss = loss_method + lam * align


def test_trainer_rejects_align_target_missing_from_the_views():
    "An align target 'attention' with two random crops fails in setup, before any step."
    from attnssl.synthetic import ClutterShapes
    from attnssl.train import Trainer, TrainConfig
    from attnssl.views import build_views
    ds = ClutterShapes(num_images=32, image_size=16, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", online_probe=False, progress=False)
    trainer = Trainer(with_align(_method("simclr"), lam=1.0), build_views("two_crop", ds), ds, cfg)
    with pytest.raises(ConfigError, match="exactly one of the two views"): trainer.fit()
    assert trainer.step == 0
