"""The target view is a named role, not a list position: view generators name their views, the align loss only
adds its term (the wrapped method keeps its own, symmetric, loss), and a method's one-directional variant is
used only when its `target_view` option asks for it."""
import pytest
import torch

from attnssl.align import ALIGN_TARGETS, with_align
from attnssl.attention import GroundTruthSource
from attnssl.core import ConfigError
from attnssl.datasets import TensorDataset
from attnssl.methods import VIEW_ROLES, build_method
from attnssl.models import build_backbone
from attnssl.views import build_views

torch.set_num_threads(1)
ROLES = ("augmented", "attention")
SMALL = {"byol": {}, "simsiam": {}, "moco_v2": {"queue_size": 32}}


def _method(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_method(name, build_backbone("resnet18", width=2, stem="small"), **SMALL[name], **kw)


def _views(n=8, size=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g).requires_grad_(grad) for _ in range(2)], {"index": torch.arange(n)}


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("target", list(ALIGN_TARGETS))
def test_view_role_wrapped_method_keeps_its_base_loss(name, target):
    "WithAlign (lam > 0) computes exactly the unwrapped method's loss as `loss_method`, then adds lam * align."
    views, batch = _views()
    plain = _method(name)
    torch.manual_seed(1); ref = plain(views, batch, roles=ROLES)
    wrapped = with_align(_method(name), lam=0.7, target=target)
    torch.manual_seed(1); out = wrapped(views, batch, roles=ROLES)
    assert torch.equal(out["loss_method"], ref["loss"].detach())
    assert torch.allclose(out["loss"], out["loss_method"] + 0.7 * out["align"])
    assert all(torch.equal(a, b) for a, b in zip(out["z"], ref["z"]))


@pytest.mark.parametrize("name", list(SMALL))
def test_view_role_one_directional_variant_only_when_asked(name):
    "Wrapped or not, the method's own loss sends gradient to both views unless `target_view` names one."
    for target_view, wrap in [(None, False), (None, True), ("attention", False), ("attention", True)]:
        m = _method(name, **({"target_view": target_view} if target_view else {}))
        if wrap: m = with_align(m, lam=0.0, target="attention")       # lam = 0: the method's loss alone
        views, batch = _views(grad=True)
        m(views, batch, roles=ROLES)["loss"].backward()
        assert views[0].grad is not None and views[0].grad.abs().sum() > 0
        att_grad = views[1].grad is not None and bool(views[1].grad.abs().sum() > 0)
        assert att_grad == (target_view is None), (target_view, wrap)


def test_view_role_target_view_follows_the_role_not_the_position():
    "The same two views listed the other way round, with their roles, give the same one-directional loss."
    views, batch = _views()
    m = _method("simsiam", target_view="attention").eval()
    a = m(views, batch, roles=ROLES)["loss"]
    b = m(views[::-1], batch, roles=ROLES[::-1])["loss"]
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, m(views[::-1], batch, roles=ROLES)["loss"], atol=1e-6)


def _toy(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8); masks[:, :, 4:12, 4:12] = 1
    images = (torch.rand(n, 3, size, size, generator=g) * 80 + masks * 150).to(torch.uint8)
    return TensorDataset(images, torch.arange(n) % 2, masks, classes=["a", "b"], mean=(0.5,) * 3, std=(0.25,) * 3)


def test_view_role_of_every_generator():
    ds = _toy()
    gt = dict(source=GroundTruthSource(), batch_size=8)
    expect = {
        "two_crop": (build_views("two_crop", ds), ("augmented", "augmented")),
        "multi_crop": (build_views("multi_crop", ds, n_local=2, local_size=8), ("augmented", "augmented", "local", "local")),
        "attention": (build_views("attention", ds, **gt), ("augmented", "attention")),
        "attention full": (build_views("attention", ds, mode="full"), ("augmented", "attention")),
        "contrastive_crop": (build_views("contrastive_crop", ds, **gt), ("augmented", "augmented")),
    }
    batch = ds.get_batch(torch.arange(len(ds)))
    for name, (gen, roles) in expect.items():
        assert gen.view_roles() == roles, name
        assert len(gen(batch, 0)) == len(roles) == gen.num_views and set(roles) <= set(VIEW_ROLES)
    interval = build_views("attention", ds, warmup_epochs=1, every=2, **gt)      # I1: two crops, then attention
    assert [interval.view_roles(e) for e in range(4)] == [("augmented", "augmented"), ("augmented", "attention"),
                                                          ("augmented", "augmented"), ("augmented", "attention")]


def test_view_role_trainer_checks_roles_for_every_epoch_before_training():
    "One-directional BYOL with target_view='attention' on interval views fails in setup: epoch 0 has no attention view."
    from attnssl.train import Trainer, TrainConfig
    ds = _toy(16)
    views = build_views("attention", ds, warmup_epochs=1, source=GroundTruthSource(), batch_size=16)
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", online_probe=False, progress=False)
    with pytest.raises(ConfigError, match="exactly one of the two views"):
        Trainer(_method("byol", target_view="attention"), views, ds, cfg).fit()
    final = Trainer(with_align(_method("byol"), lam=1.0, target="symmetric"), views, ds, cfg).fit()
    assert {"loss", "loss_method", "align"} <= set(final) and final["loss"] >= final["loss_method"]


def test_view_role_config_sections_reach_the_method():
    "What experiments.pretrain passes: build_method(name, backbone, **cfg['method']), with_align(method, **cfg['align'])."
    cfg = {"method": {"name": "byol", "target_view": "attention"}, "align": {"lam": 1.0, "target": "augmented"}}
    m = dict(cfg["method"]); name = m.pop("name")
    torch.manual_seed(0)
    method = with_align(build_method(name, build_backbone("resnet18", width=2, stem="small"), **m), **cfg["align"])
    assert method.target_view == "attention" and method.target == "augmented"
    assert method.check_roles(ROLES) == 0 and method.method.check_roles(ROLES) == 1
    with pytest.raises(ConfigError, match="target_view"):
        build_method("byol", build_backbone("resnet18", width=2, stem="small"), target_view=1)
