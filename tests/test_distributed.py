"""attnssl.distributed: single-process no-ops, and 2 CPU processes (gloo) reproducing single-process losses and gradients.

Gradient convention: `gather_with_grad` sums the gradients of all ranks in its backward. Each rank's loss is the
mean over its own anchors, so with DDP-style *averaging* of gradients over ranks (what DDP does) the update equals
the single-process gradient of the loss on the concatenated batch. Without averaging, the gradient w.r.t. a rank's
inputs is `world_size` times the single-process one: the tests below check both statements.
"""
import os
import pytest
import torch
import torch.nn as nn

from attnssl.core import ConfigError
from attnssl import distributed as D
from attnssl.losses import nt_xent, contrastive_stats, dino_center_update, memory_bank_update

W, B, DIM = 2, 3, 5

def test_not_distributed_is_identity():
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main_process()
    x = torch.randn(4, 3, requires_grad=True)
    assert D.gather_with_grad(x) is x
    g = D.gather_no_grad(x)
    assert torch.equal(g, x) and not g.requires_grad
    assert torch.equal(D.all_reduce_mean(x), x.detach())
    D.barrier(); D.cleanup()

def test_init_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env(device="cpu") == torch.device("cpu") and not D.is_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"): monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        D.init_from_env(device="cpu")

def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(W * B, DIM, generator=g, dtype=torch.float64), torch.randn(W * B, DIM, generator=g, dtype=torch.float64),
            [torch.randn(W * B, 4, generator=g, dtype=torch.float64) for _ in range(2)])

def _worker() -> dict:
    "Runs on every rank: the rank holds rows [rank*B, (rank+1)*B) of the common batch."
    r, n = D.rank(), D.world_size()
    rows = slice(r * B, (r + 1) * B)
    z1, z2, teacher = _data()
    out = {"rank": r, "world_size": n, "loss": {}, "g1": {}, "g2": {}, "main": D.is_main_process(),
           "distributed": D.is_distributed()}
    D.barrier()
    for tau in (0.1, 0.5):
        x1, x2 = z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)
        loss = nt_xent(x1, x2, tau, gather=True)
        out["loss"][tau] = loss.detach()
        out["g1"][tau], out["g2"][tau] = torch.autograd.grad(loss, (x1, x2))
    out["local_loss"] = nt_xent(z1[rows], z2[rows], 0.5, gather=False)          # no gather: this rank alone
    # DDP-style step: a shared linear projector, one forward on both views, parameter gradients averaged over
    # ranks exactly as DDP's reducer does (DDP itself is not used: its first construction imports torch._dynamo,
    # ~10 s per process on a loaded machine).
    torch.manual_seed(0)
    net = nn.Linear(DIM, DIM).double()
    h = net(torch.cat([z1[rows], z2[rows]]))
    nt_xent(h[:B], h[B:], 0.2, gather=True).backward()
    out["ddp_grad"] = [D.all_reduce_mean(p.grad) for p in net.parameters()]
    # Helpers that gather without gradient.
    out["gathered"] = D.gather_no_grad(z1[rows])
    out["mean"] = D.all_reduce_mean(torch.tensor([float(r)]))
    center = torch.zeros(1, 4, dtype=torch.float64)
    out["center"] = dino_center_update(center, [t[rows] for t in teacher], momentum=0.5).clone()
    bank = torch.nn.functional.normalize(torch.ones(W * B, DIM, dtype=torch.float64), dim=1)
    out["bank"] = memory_bank_update(bank, z1[rows], torch.arange(W * B)[rows], momentum=0.0).clone()
    out["check"] = D._check_gather_worker(2, 3, 7)
    return out

@pytest.fixture(scope="module")
def ranks():
    # fork: the children reuse the imported torch (spawn re-imports it: ~3 s of CPU per child)
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    return D.launch_local(_worker, world_size=W, start_method=method)

def test_ranks_started(ranks):
    assert [o["rank"] for o in ranks] == [0, 1] and all(o["world_size"] == W and o["distributed"] for o in ranks)
    assert [o["main"] for o in ranks] == [True, False]

@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_gather_equals_single_process(ranks, tau):
    z1, z2, _ = _data()
    x1, x2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = nt_xent(x1, x2, tau)                                          # one process, whole batch
    g1, g2 = torch.autograd.grad(loss, (x1, x2))
    # The loss a trainer logs (mean over ranks) is the single-process loss.
    assert torch.allclose(torch.stack([o["loss"][tau] for o in ranks]).mean(), loss, atol=1e-12)
    for o in ranks:
        rows = slice(o["rank"] * B, (o["rank"] + 1) * B)
        # Summed over ranks by gather_with_grad: W x the single-process gradient; DDP's averaging divides by W.
        assert torch.allclose(o["g1"][tau] / W, g1[rows], atol=1e-12)
        assert torch.allclose(o["g2"][tau] / W, g2[rows], atol=1e-12)

def test_no_gather_is_local_only(ranks):
    z1, z2, _ = _data()
    for o in ranks:
        rows = slice(o["rank"] * B, (o["rank"] + 1) * B)
        assert torch.allclose(o["local_loss"], nt_xent(z1[rows], z2[rows], 0.5))

def test_ddp_parameter_gradient_equals_single_process(ranks):
    z1, z2, _ = _data()
    torch.manual_seed(0)
    net = nn.Linear(DIM, DIM).double()
    h = net(torch.cat([z1, z2]))
    nt_xent(h[:W * B], h[W * B:], 0.2).backward()
    for o in ranks:
        for got, p in zip(o["ddp_grad"], net.parameters()):
            assert torch.allclose(got, p.grad, atol=1e-12)

def test_gather_helpers(ranks):
    z1, _, teacher = _data()
    for o in ranks:
        assert torch.equal(o["gathered"], z1)
        assert o["mean"].item() == 0.5
        assert torch.allclose(o["center"], 0.5 * torch.cat(teacher).mean(0, keepdim=True))  # centre over all ranks
        assert torch.allclose(o["bank"], torch.nn.functional.normalize(z1, dim=1))        # every rank's rows written
        assert max((o["check"]["gathered"] - ranks[0]["check"]["gathered"]).abs().max().item(), 0) == 0

def test_gather_with_grad_sums_gradients_of_all_ranks(ranks):
    g = torch.Generator().manual_seed(7)
    full = torch.randn(W * 2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(W * 2, W * 2, generator=g, dtype=torch.float64)
    (full @ full.T * w).sum().backward()
    for o in ranks:
        r = o["check"]["rank"]
        assert torch.allclose(o["check"]["grad"], full.grad[r * 2:(r + 1) * 2], atol=1e-12)
