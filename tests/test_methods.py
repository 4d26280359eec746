"""Methods: forward/backward, target branches (the view named by `target_view`) get no gradient, roles, EMA / queue / bank / centre updates,
state_dict round trips, build_method errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnssl.core import ConfigError
from attnssl.methods import (BYOL, DINO, METHODS, MemoryBank, MoCoV1, MoCoV2, NNCLR, SimCLR, SimSiam, VIEW_ROLES,
                             build_method, fifo_enqueue_, method_hparams, role_index)
from attnssl.models import build_backbone, cosine_momentum

torch.set_num_threads(1)
B, S, N = 8, 16, 64                 # batch, image size, dataset size (memory bank)

KW = {"memory_bank": dict(num_samples=N, num_negatives=16), "moco_v1": dict(queue_size=32),
      "moco_v2": dict(queue_size=32), "nnclr": dict(queue_size=32),
      "dino": dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)}
TARGET_PREFIX = {"moco_v1": "key_", "moco_v2": "key_", "byol": "target_", "harl": "target_", "dino": "teacher_"}
ROLES = ("augmented", "attention")   # the attention views' roles
# the contrastive methods of attnssl.methods (the registry also holds methods of other modules: pretext tasks, ...)
CONTRASTIVE = ("simclr", "moco_v1", "moco_v2", "byol", "simsiam", "nnclr", "dino", "memory_bank")


def backbone():
    return build_backbone("resnet18", width=4)


def make(name, **kw):
    torch.manual_seed(0)
    return build_method(name, backbone(), **{**KW.get(name, {}), **kw})


def views_batch(seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, S, S, generator=g).requires_grad_(grad) for _ in range(2)]
    masks = [torch.zeros(B, 1, S, S) for _ in views]          # per-view foreground masks (read by HARL)
    for m in masks: m[..., S // 4:3 * S // 4, S // 4:3 * S // 4] = 1
    return views, {"index": torch.arange(10, 10 + B), "label": torch.zeros(B, dtype=torch.long), "view_masks": masks}


@pytest.mark.parametrize("name", sorted(CONTRASTIVE))
def test_forward_backward_contract(name):
    m = make(name)
    views, batch = views_batch()
    out = m(views, batch)
    assert set(out) >= {"loss", "z", "h0", "p_pos", "s_pos", "s_neg"}
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert len(out["z"]) == 2 and all(z.shape[0] == B and z.requires_grad for z in out["z"])
    assert out["h0"].shape == (B, m.backbone.out_dim) and not out["h0"].requires_grad
    assert torch.isfinite(out["s_pos"]) and torch.isfinite(out["s_neg"])
    assert math.isnan(float(out["p_pos"])) == (name in ("byol", "simsiam", "dino", "harl"))
    out["loss"].backward()
    g = m.backbone.stem[0].weight.grad
    assert g is not None and g.abs().sum() > 0
    assert m.encode(views[0]).shape == (B, m.backbone.out_dim)
    assert m.name == name and m.num_views == 2


@pytest.mark.parametrize("name", [n for n in sorted(CONTRASTIVE) if n != "simclr"])
@pytest.mark.parametrize("target_view", ["augmented", "attention"])
@pytest.mark.parametrize("roles", [ROLES, ROLES[::-1]])
def test_target_view_gets_no_gradient(name, target_view, roles):
    "The view whose role is `target_view` feeds only the target branch, wherever it sits in the list."
    m = make(name, target_view=target_view)
    views, batch = views_batch(grad=True)
    out = m(views, batch, roles=roles)
    target = roles.index(target_view)
    out["loss"].backward()
    assert views[1 - target].grad is not None and views[1 - target].grad.abs().sum() > 0
    assert views[target].grad is None or views[target].grad.abs().sum() == 0
    assert not out["z"][target].requires_grad and out["z"][1 - target].requires_grad
    prefix = TARGET_PREFIX.get(name)
    if prefix:                                       # the momentum branch never takes gradients
        tparams = [p for n, p in m.named_parameters() if n.startswith(prefix)]
        assert tparams and all(not p.requires_grad and p.grad is None for p in tparams)


@pytest.mark.parametrize("name", sorted(CONTRASTIVE))
def test_symmetric_both_views_get_gradient(name):
    m = make(name)
    views, batch = views_batch(grad=True)
    m(views, batch)["loss"].backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in views)


def test_simclr_has_no_target_view_and_roles_are_checked():
    m = make("simclr")
    views, batch = views_batch()
    m.eval()
    assert torch.allclose(m(views, batch)["loss"], m(views, batch, roles=ROLES)["loss"])
    with pytest.raises(ConfigError, match="target_view"):     # no target branch: not a SimCLR option
        make("simclr", target_view="attention")
    with pytest.raises(ConfigError, match="unknown view role"):
        m(views, batch, roles=("augmented", "masked"))
    with pytest.raises(ConfigError, match="names 3"):
        m(views, batch, roles=ROLES + ("local",))
    with pytest.raises(ConfigError, match="2 views"):
        m(views[:1], batch)


def test_target_view_needs_roles_naming_one_view():
    m = make("byol", target_view="attention")
    views, batch = views_batch()
    with pytest.raises(ConfigError, match="no roles were given"):
        m(views, batch)
    with pytest.raises(ConfigError, match="exactly one of the two views"):   # two random crops: no attention view
        m(views, batch, roles=("augmented", "augmented"))
    with pytest.raises(ConfigError, match="target_view='key'"):
        make("byol", target_view="key")
    with pytest.raises(ConfigError, match="target_view"):                     # an index is not a role
        make("moco_v2", target_view=1)
    assert m.check_roles(ROLES) == 1 and m.check_roles(ROLES[::-1]) == 0 and make("byol").check_roles(None) is None
    assert role_index(("augmented", "attention", "local"), "attention") == 1 and set(ROLES) <= set(VIEW_ROLES)


@pytest.mark.parametrize("name", sorted(CONTRASTIVE))
def test_export_backbone_is_the_trained_encoder_or_dino_teacher(name):
    m = make(name)
    assert m.export_backbone() is (m.teacher_backbone if name == "dino" else m.backbone)


def test_fifo_enqueue_semantics():
    q, ptr = torch.zeros(5, 1), torch.zeros((), dtype=torch.long)
    fifo_enqueue_(q, ptr, torch.tensor([[1.], [2.], [3.]]))
    assert q.flatten().tolist() == [1, 2, 3, 0, 0] and int(ptr) == 3
    fifo_enqueue_(q, ptr, torch.tensor([[4.], [5.], [6.]]))     # wraps: 6 overwrites the oldest (1)
    assert q.flatten().tolist() == [6, 2, 3, 4, 5] and int(ptr) == 1
    fifo_enqueue_(q, ptr, torch.arange(10., 17.)[:, None])     # 7 keys > K=5: only the newest 5 survive
    assert sorted(q.flatten().tolist()) == [12, 13, 14, 15, 16] and int(ptr) == (1 + 7) % 5
    assert q[int(ptr) - 1].item() == 16                         # the newest sits just before the pointer
    fifo_enqueue_(q, ptr, torch.zeros(0, 1))
    assert int(ptr) == 3


@pytest.mark.parametrize("cls", [MoCoV1, MoCoV2])
def test_moco_queue_and_ema(cls):
    torch.manual_seed(0)
    m = cls(backbone(), queue_size=20, momentum=0.9, target_view="attention")
    views, batch = views_batch()
    out = m(views, batch, roles=ROLES)                            # view 1 only through the key encoder
    out["loss"].backward()
    online_before = [p.detach().clone() for p in m.backbone.parameters()]
    key_before = [p.detach().clone() for p in m.key_backbone.parameters()]
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5).step()
    m.on_step_end(1, 10)
    assert int(m.queue_ptr) == B
    assert torch.allclose(m.queue[:B], F.normalize(out["z"][1], dim=1), atol=1e-6)
    for pk, k0, po in zip(m.key_backbone.parameters(), key_before, m.backbone.parameters()):
        assert torch.allclose(pk, 0.9 * k0 + 0.1 * po, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(online_before, m.backbone.parameters()))
    # symmetric step enqueues both views' keys; the pointer wraps past K=20
    m.target_view = None
    m(views, batch)["loss"].backward(); m.on_step_end(2, 10)
    assert int(m.queue_ptr) == (B + 2 * B) % 20
    # evaluation forwards never touch the queue
    m.eval(); q = m.queue.clone(); m(views, batch); m.on_step_end(3, 10)
    assert torch.equal(q, m.queue)


def test_moco_v1_v2_heads_and_shuffled_bn_keys():
    v1, v2 = make("moco_v1"), make("moco_v2")
    assert len(v1.projector) == 1 and v1.temperature == 0.07
    assert len(v2.projector) == 3 and v2.temperature == 0.2 and v2.queue.shape == (32, 128)
    x = torch.randn(B, 3, S, S)
    v2.train()
    torch.manual_seed(5); h, k = v2._keys(x)
    torch.manual_seed(5); perm = torch.randperm(B)
    parts = [v2.key_backbone(c) for c in x[perm].chunk(2)]
    ref = torch.cat([v2.key_projector(p) for p in parts])
    inv = torch.argsort(perm)
    assert torch.allclose(k, ref[inv], atol=1e-5) and torch.allclose(h, torch.cat(parts)[inv], atol=1e-5)
    v2.eval()
    _, k_eval = v2._keys(x)
    assert torch.allclose(k_eval, v2.key_projector(v2.key_backbone(x)), atol=1e-5)


def test_byol_ema_cosine_schedule():
    torch.manual_seed(0)
    m = BYOL(backbone(), momentum=0.9)
    views, batch = views_batch()
    m(views, batch)["loss"].backward()
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5).step()
    t0 = [p.clone() for p in m.target_projector.parameters()]
    m.on_step_end(3, 10)
    mom = cosine_momentum(0.9, 3, 10)
    for pt, a, po in zip(m.target_projector.parameters(), t0, m.projector.parameters()):
        assert torch.allclose(pt, mom * a + (1 - mom) * po, atol=1e-6)
    t1 = [p.clone() for p in m.target_backbone.parameters()]
    m.on_step_end(10, 10)                                      # end of training: momentum 1, target frozen
    assert all(torch.equal(a, b) for a, b in zip(t1, m.target_backbone.parameters()))
    with pytest.raises(ConfigError, match="cosine"):
        BYOL(backbone(), momentum_schedule="linear")


def test_simsiam_stop_gradient_matches_manual():
    torch.manual_seed(0)
    m = SimSiam(backbone(), target_view="attention")
    views, batch = views_batch()
    m.eval()                                                    # deterministic BN for a value check
    out = m(views, batch, roles=ROLES)
    z0 = m.projector(m.backbone(views[0])); p0 = m.predictor(z0)
    z1 = m.projector(m.backbone(views[1]))
    assert torch.allclose(out["loss"], -F.cosine_similarity(p0, z1).mean(), atol=1e-5)
    assert m.predictor[0].out_features == m.backbone.out_dim // 4
    assert isinstance(m.projector[-1], torch.nn.BatchNorm1d) and not m.projector[-1].affine


def test_nnclr_support_queue():
    m = make("nnclr")
    views, batch = views_batch()
    out = m(views, batch); out["loss"].backward(); m.on_step_end(1, 5)
    assert int(m.queue_ptr) == B
    assert torch.allclose(m.queue[:B], F.normalize(out["z"][0], dim=1), atol=1e-6)


def test_memory_bank_rows():
    m = make("memory_bank", target_view="attention")
    views, batch = views_batch()
    before = m.bank.clone()
    out = m(views, batch, roles=ROLES); out["loss"].backward(); m.on_step_end(1, 5)
    idx = batch["index"]
    changed = (m.bank != before).any(1).nonzero().flatten()
    assert changed.tolist() == idx.tolist()
    expected = F.normalize(0.5 * before[idx] + 0.5 * F.normalize(out["z"][1], dim=1), dim=1)
    assert torch.allclose(m.bank[idx], expected, atol=1e-5)
    assert torch.allclose(m.bank.norm(dim=1), torch.ones(N), atol=1e-5)
    with pytest.raises(ConfigError, match="index"):
        m(views, {"label": batch["label"]}, roles=ROLES)
    with pytest.raises(ConfigError, match="num_samples"):
        m(views, {"index": torch.arange(N - 2, N - 2 + B)}, roles=ROLES)
    with pytest.raises(ConfigError, match="num_samples"):
        MemoryBank(backbone())


def test_dino_centre_multicrop_and_temperature():
    torch.manual_seed(0)
    vit = build_backbone("vit", embed_dim=16, depth=1, num_heads=2, img_size=16)
    m = DINO(vit, out_dim=32, hidden_dim=16, bottleneck_dim=8, n_local=2, warmup_teacher_temp=0.02,
             warmup_teacher_temp_steps=10, teacher_temp=0.06)
    assert m.num_views == 4
    views = [torch.randn(B, 3, 16, 16) for _ in range(2)] + [torch.randn(B, 3, 8, 8) for _ in range(2)]
    with torch.no_grad():
        t = torch.cat([m.teacher_head(m.teacher_backbone(v))[0] for v in views[:2]])
    out = m(views, {})
    assert len(out["z"]) == 4 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.head.last_v.grad is not None and m.head.last_g.grad is None     # norm of the last layer fixed
    assert m.current_teacher_temp() == pytest.approx(0.02)
    m.on_step_end(4, 100)                                      # the 5th step (0-based index 4) is done
    assert torch.allclose(m.center, 0.1 * t.mean(0, keepdim=True), atol=1e-6)
    assert int(m.step) == 5 and m.current_teacher_temp() == pytest.approx(0.04)
    m.on_step_end(50, 100)
    assert m.current_teacher_temp() == pytest.approx(0.06)
    with pytest.raises(ConfigError, match="4 views"):
        m(views[:2], {})
    with pytest.raises(ConfigError, match="two views"):
        DINO(vit, out_dim=32, hidden_dim=16, bottleneck_dim=8, n_local=2, target_view="attention")


@pytest.mark.parametrize("name", ["moco_v2", "nnclr", "memory_bank", "dino", "byol"])
def test_state_dict_round_trip(name):
    m = make(name)
    views, batch = views_batch()
    for step in range(2):
        m(views, batch)["loss"].backward(); m.on_step_end(step + 1, 10)
    sd = m.state_dict()
    fresh = make(name)
    fresh.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for buf in ("queue", "queue_ptr", "bank", "center", "step"):
        if hasattr(m, buf):
            assert torch.equal(getattr(fresh, buf), getattr(m, buf))
    # the restored EMA still points at the restored networks
    if hasattr(fresh, "_ema"):
        fresh.on_step_end(3, 10)
        m.on_step_end(3, 10)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))


def test_build_method_errors_and_hparams():
    with pytest.raises(ConfigError, match="simclr.*simsiam|valid methods"):
        build_method("simclr2", backbone())
    with pytest.raises(ConfigError, match="temperature"):     # byol has no temperature: the valid list is shown
        build_method("simclr", backbone(), temprature=0.1)
    with pytest.raises(ConfigError, match="momentum"):
        build_method("byol", backbone(), temperature=0.1)
    with pytest.raises(ConfigError, match="schedule"):
        build_method("moco_v2", backbone(), momentum_schedule="step")
    assert set(CONTRASTIVE) <= set(METHODS) and {"rotnet", "jigsaw", "context_encoder", "pirl", "harl"} <= set(METHODS)
    assert method_hparams("simclr")["temperature"] == 0.5 and method_hparams("byol")["momentum"] == 0.996
    m = build_method("simclr", backbone(), proj_dim=32, temperature=0.2)
    assert isinstance(m, SimCLR) and m.projector[-1].out_features == 32 and m.temperature == 0.2
    assert m.projector[0].out_features == m.backbone.out_dim   # hidden width scales with the backbone


def _ddp_worker():
    "On each of 2 gloo ranks: one MoCo step and one memory-bank step with rank-specific data."
    from attnssl.distributed import rank
    torch.manual_seed(0)                                        # identical initial networks, queue and bank
    moco = MoCoV2(build_backbone("resnet18", width=4), queue_size=64, target_view="attention")
    bank = MemoryBank(build_backbone("resnet18", width=4), num_samples=32, num_negatives=4, target_view="attention")
    torch.manual_seed(100 + rank())
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    out = moco(views, {}, roles=ROLES); moco.on_step_end(0, 10)
    bank(views, {"index": torch.arange(4) + 4 * rank()}, roles=ROLES); bank.on_step_end(0, 10)
    return {"queue": moco.queue.clone(), "ptr": int(moco.queue_ptr), "bank": bank.bank.clone(),
            "key": F.normalize(out["z"][1].detach(), dim=1)}


def test_queue_and_bank_gathered_across_ranks():
    from attnssl.distributed import launch_local
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    r0, r1 = launch_local(_ddp_worker, world_size=2, start_method=method)
    assert r0["ptr"] == r1["ptr"] == 8                          # both ranks' keys went into both queues
    assert torch.equal(r0["queue"], r1["queue"])
    assert torch.allclose(r0["queue"][:8], torch.cat([r0["key"], r1["key"]]), atol=1e-6)
    assert torch.equal(r0["bank"], r1["bank"])                  # rows 0-3 from rank 0, 4-7 from rank 1


def test_dino_freeze_last_layer_steps():
    torch.manual_seed(0)
    m = DINO(backbone(), out_dim=16, hidden_dim=8, bottleneck_dim=4, freeze_last_layer_steps=2)
    views, batch = views_batch()
    m(views, batch)["loss"].backward()
    assert m.head.last_v.grad is None and m.head.mlp[0].weight.grad is not None
    m.on_step_end(0, 10); m.on_step_end(1, 10)                 # two steps done: the layer trains from now on
    m(views, batch)["loss"].backward()
    assert m.head.last_v.grad is not None


def test_register_method_makes_a_method_buildable_by_name():
    from attnssl.methods import METHODS, SimCLR, build_method, register_method
    from attnssl.core import ConfigError
    class Renamed(SimCLR): name = "renamed"
    try:
        register_method("renamed")(Renamed)
        assert isinstance(build_method("renamed", build_backbone("resnet18", width=4)), Renamed)
        register_method("renamed")(Renamed)                        # the same class again: harmless
        with pytest.raises(ConfigError, match="taken"): register_method("simclr")(Renamed)
        with pytest.raises(ConfigError, match="Method subclass"): register_method("x")(int)
    finally: METHODS.pop("renamed", None)


def test_simclr_head_none_linear_nonlinear():
    "SimCLR's head study: proj_layers=0 is the identity (NT-Xent on h), 1 one linear layer, 2 the MLP; < 0 is an error."
    from attnssl.losses import nt_xent
    from attnssl.methods import SimCLR
    from attnssl.models import build_backbone
    torch.manual_seed(0)
    views = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    none = SimCLR(build_backbone("resnet18", width=2), proj_layers=0)
    out = none(views)
    h = [none.backbone(v) for v in views]
    assert isinstance(none.projector, torch.nn.Identity) and torch.equal(out["z"][0], h[0])
    assert torch.allclose(out["loss"], nt_xent(h[0], h[1], 0.5), atol=1e-6)
    lin = SimCLR(build_backbone("resnet18", width=2), proj_layers=1, proj_dim=12)
    assert [type(m) for m in lin.projector] == [torch.nn.Linear] and lin(views)["z"][0].shape == (6, 12)
    with pytest.raises(ConfigError, match="proj_layers"): SimCLR(build_backbone("resnet18", width=2), proj_layers=-1)
