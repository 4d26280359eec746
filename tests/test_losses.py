"""attnssl.losses against naive Python loops (float64): values and gradients, stop-gradients, invariances, bad input."""
import math
import pytest
import torch
import torch.nn.functional as F

from attnssl.core import ConfigError
from attnssl.losses import (nt_xent, contrastive_stats, moco_loss, byol_loss, simsiam_loss, dino_loss,
                            dino_center_update, align_loss, uniformity, memory_bank_loss, memory_bank_update,
                            sample_negatives, nnclr_loss, nearest_neighbour)

TAUS = [0.07, 0.2, 0.5, 1.0]
D64 = torch.float64

def unit(v): return v / torch.sqrt((v * v).sum())
def dot(a, b): return (a * b).sum()
def rnd(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D64).requires_grad_(grad)
def grads(out, inputs):
    return torch.autograd.grad(out, inputs, allow_unused=True, retain_graph=True)
def assert_same(a, b, inputs, tol=1e-9):
    "Equal values and equal gradients w.r.t. every input (None = no gradient on both sides)."
    assert abs(a.item() - b.item()) < tol, (a.item(), b.item())
    for ga, gb in zip(grads(a, inputs), grads(b, inputs)):
        if ga is None or gb is None:
            assert ga is None and (gb is None or gb.abs().max() == 0)
        else:
            assert torch.allclose(ga, gb, atol=tol, rtol=1e-7), (ga - gb).abs().max()

# ---------------------------------------------------------------- naive references
def ref_nt_xent(z1, z2, tau):
    b = len(z1); z = [unit(v) for v in list(z1) + list(z2)]; loss = 0
    for i in range(2 * b):
        pos = i + b if i < b else i - b
        den = 0
        for k in range(2 * b):
            if k != i: den = den + math.e ** (dot(z[i], z[k]) / tau)
        loss = loss - torch.log(math.e ** (dot(z[i], z[pos]) / tau) / den)
    return loss / (2 * b)

def ref_stats(z1, z2, tau):
    b = len(z1); z = [unit(v) for v in list(z1) + list(z2)]; p, sp, sn = [], [], []
    for i in range(2 * b):
        pos = i + b if i < b else i - b
        den = sum(math.exp(dot(z[i], z[k]).item() / tau) for k in range(2 * b) if k != i)
        p.append(math.exp(dot(z[i], z[pos]).item() / tau) / den); sp.append(dot(z[i], z[pos]).item())
        sn += [dot(z[i], z[k]).item() for k in range(2 * b) if k not in (i, pos)]
    return sum(p) / len(p), sum(sp) / len(sp), sum(sn) / len(sn)

def ref_moco(q, k, queue, tau):
    loss = 0
    for i in range(len(q)):
        qi, ki = unit(q[i]), unit(k[i]).detach()
        logits = [dot(qi, ki) / tau] + [dot(qi, unit(m)) / tau for m in queue]
        loss = loss - (logits[0] - torch.log(sum(torch.exp(l) for l in logits)))
    return loss / len(q)

def ref_cos(p, z):
    return [dot(unit(p[i]), unit(z[i].detach())) for i in range(len(p))]

def ref_dino(students, teachers, center, ts, tt):
    loss, pairs = 0, 0
    for a in range(len(teachers)):
        for v in range(len(students)):
            if a == v: continue
            pairs += 1
            for b in range(len(teachers[a])):
                e = [math.exp((teachers[a][b][j].item() - center[j].item()) / tt) for j in range(len(center))]
                q = [x / sum(e) for x in e]
                s = students[v][b] / ts
                logz = torch.log(sum(torch.exp(s[j]) for j in range(len(s))))
                loss = loss - sum(q[j] * (s[j] - logz) for j in range(len(q))) / len(teachers[a])
    return loss / pairs

def ref_uniformity(z, t):
    zs = [unit(v) for v in z]; terms = []
    for i in range(len(zs)):
        for k in range(i + 1, len(zs)):
            terms.append(torch.exp(-t * ((zs[i] - zs[k]) ** 2).sum()))
    return torch.log(sum(terms) / len(terms))

def ref_bank(z, index, bank, negs, tau):
    loss = 0
    for i in range(len(z)):
        zi = unit(z[i])
        pos = torch.exp(dot(zi, unit(bank[index[i]])) / tau)
        neg = sum(torch.exp(dot(zi, unit(bank[j])) / tau) for j in negs[i])
        loss = loss - torch.log(pos / (pos + neg))
    return loss / len(z)

def ref_nnclr(z1, z2, support, tau):
    loss = 0
    for i in range(len(z1)):
        best, nn = -2.0, None
        for s in support:
            c = dot(unit(s), unit(z1[i])).item()
            if c > best: best, nn = c, unit(s).detach()
        den = sum(torch.exp(dot(nn, unit(z2[k])) / tau) for k in range(len(z2)))
        loss = loss - torch.log(torch.exp(dot(nn, unit(z2[i])) / tau) / den)
    return loss / len(z1)

# ---------------------------------------------------------------- NT-Xent and its statistics
@pytest.mark.parametrize("tau", TAUS)
def test_nt_xent_matches_loop(tau):
    z1, z2 = rnd(5, 7, seed=1), rnd(5, 7, seed=2)
    assert_same(nt_xent(z1, z2, tau), ref_nt_xent(z1, z2, tau), (z1, z2))

def test_nt_xent_scale_invariant_and_gather_noop():
    z1, z2 = rnd(4, 6, seed=3), rnd(4, 6, seed=4)
    a = nt_xent(z1, z2, 0.3)
    assert torch.allclose(a, nt_xent(3 * z1, 0.5 * z2, 0.3))            # normalised inside
    assert torch.equal(a, nt_xent(z1, z2, 0.3, gather=True))             # not distributed: gather is a no-op
    assert torch.allclose(a, nt_xent(z2, z1, 0.3))                       # symmetric in the two views

def test_nt_xent_single_pair_and_extreme_temperature():
    z1, z2 = rnd(1, 4, seed=5), rnd(1, 4, seed=6)
    assert nt_xent(z1, z2, 0.1).abs().item() < 1e-12                     # only the positive in the denominator
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)                       # float32, tiny temperature: stays finite
    out = nt_xent(z1.requires_grad_(), z2, 0.01)
    assert torch.isfinite(out) and torch.isfinite(torch.autograd.grad(out, z1)[0]).all()

@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_contrastive_stats_matches_loop(tau):
    z1, z2 = rnd(5, 7, seed=7), rnd(5, 7, seed=8)
    st = contrastive_stats(z1, z2, tau)
    assert set(st) == {"p_pos", "s_pos", "s_neg"} and not any(v.requires_grad for v in st.values())
    for got, want in zip((st["p_pos"], st["s_pos"], st["s_neg"]), ref_stats(z1.detach(), z2.detach(), tau)):
        assert abs(got.item() - want) < 1e-5                              # computed in float32

def test_contrastive_stats_identical_views():
    z = rnd(6, 8, seed=9, grad=False)
    st = contrastive_stats(z, z, 0.1)
    assert abs(st["s_pos"].item() - 1) < 1e-6 and st["p_pos"].item() > 0.5
    assert math.isnan(contrastive_stats(z[:1], z[:1], 0.1)["s_neg"].item())  # no negatives in a batch of one

def test_p_pos_gradient_share():
    "dL_i/ds_ij = -(1 - p_ij)/tau, checked on one anchor with autograd (see nbs/method.ipynb, section 5: over-confidence of InfoNCE)."
    tau = 0.2; s = rnd(6, seed=10)                                        # similarities of anchor 0 to k=1..6; k=1 positive
    loss = -torch.log_softmax(s / tau, 0)[0]
    p = torch.softmax(s / tau, 0)[0]
    assert abs(torch.autograd.grad(loss, s)[0][0].item() + (1 - p.item()) / tau) < 1e-12

# ---------------------------------------------------------------- MoCo, BYOL, SimSiam, align
@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_moco_matches_loop(tau):
    q, k, queue = rnd(4, 5, seed=11), rnd(4, 5, seed=12), rnd(9, 5, seed=13)
    out = moco_loss(q, k, queue, tau)
    assert_same(out, ref_moco(q, k, queue, tau), (q,))
    assert grads(out, (k, queue)) == (None, None)                        # key and queue: no gradient

def test_byol_simsiam_match_loop():
    p, z = rnd(5, 6, seed=14), rnd(5, 6, seed=15)
    assert_same(byol_loss(p, z), sum(2 - 2 * c for c in ref_cos(p, z)) / 5, (p,))
    assert_same(simsiam_loss(p, z), -sum(ref_cos(p, z)) / 5, (p,))
    assert grads(byol_loss(p, z), (z,)) == (None,) and grads(simsiam_loss(p, z), (z,)) == (None,)
    assert abs(byol_loss(p, p).item()) < 1e-12 and abs(simsiam_loss(p, p).item() + 1) < 1e-12

def test_align_loss_is_2_minus_2cos_with_stop_gradient():
    zo, zt = rnd(6, 5, seed=16), rnd(6, 5, seed=17)
    out = align_loss(zo, zt)
    ref = sum(2 - 2 * dot(unit(zo[i]), unit(zt[i]).detach()) for i in range(6)) / 6
    assert_same(out, ref, (zo,))
    assert grads(out, (zt,)) == (None,)
    assert torch.allclose(out, byol_loss(zo, zt))                          # BYOL's loss without a predictor
    assert torch.allclose(out, align_loss(4 * zo, 0.1 * zt))               # normalised inside

def test_align_loss_symmetric_without_stop_gradient():
    zo, zt = rnd(6, 5, seed=18), rnd(6, 5, seed=19)
    out = align_loss(zo, zt, stop_grad=False)
    ref = sum(2 - 2 * dot(unit(zo[i]), unit(zt[i])) for i in range(6)) / 6
    assert_same(out, ref, (zo, zt))
    g_o, g_t = grads(out, (zo, zt))
    g_o2, g_t2 = grads(align_loss(zt, zo, stop_grad=False), (zt, zo))
    assert torch.allclose(g_o, g_t2) and torch.allclose(g_t, g_o2)       # symmetric in its arguments

def test_align_gradient_survives_where_infonce_saturates():
    "nbs/method.ipynb, sections 5-6: positives at cos 0.8 with near-orthogonal negatives, tau 0.05: InfoNCE's pull is ~0, align's is not."
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(64, 64, generator=g, dtype=D64), dim=1)
    u = torch.randn(64, 64, generator=g, dtype=D64); u = F.normalize(u - (u * z1).sum(1, keepdim=True) * z1, dim=1)
    z2 = 0.8 * z1 + 0.6 * u
    z1.requires_grad_(True)
    assert contrastive_stats(z1, z2, 0.05)["p_pos"] > 0.99
    g_nce = torch.autograd.grad(nt_xent(z1, z2, 0.05), z1)[0].norm(dim=1).mean()
    g_align = torch.autograd.grad(align_loss(z1, z2), z1)[0].norm(dim=1).mean()
    assert g_align > 50 * g_nce

# ---------------------------------------------------------------- uniformity
@pytest.mark.parametrize("t", [0.5, 2.0, 5.0])
def test_uniformity_matches_loop(t):
    z = rnd(7, 4, seed=20)
    assert_same(uniformity(z, t), ref_uniformity(z, t), (z,))

def test_uniformity_invariances():
    z = rnd(8, 5, seed=21, grad=False)
    u = uniformity(z)
    rot = torch.linalg.qr(rnd(5, 5, seed=22, grad=False))[0]
    assert torch.allclose(u, uniformity(z @ rot))                           # rotation
    assert torch.allclose(u, uniformity(z * (0.1 + torch.rand(8, 1, dtype=D64))))  # per-row scale
    assert torch.allclose(u, uniformity(z[torch.randperm(8)]))             # order
    assert abs(uniformity(torch.ones(4, 3)).item()) < 1e-6                 # collapse: the maximum, 0
    assert abs(uniformity(torch.eye(4), 2).item() - (-4.0)) < 1e-6          # orthonormal: ||zi-zk||^2 = 2
    zdup = torch.cat([z[:1], z[:1], z[1:3]]).requires_grad_(True)           # coincident rows: finite gradient
    assert torch.isfinite(torch.autograd.grad(uniformity(zdup), zdup)[0]).all()

# ---------------------------------------------------------------- DINO
@pytest.mark.parametrize("ts,tt", [(0.1, 0.04), (0.2, 0.07), (1.0, 1.0)])
def test_dino_matches_loop_with_center(ts, tt):
    students = [rnd(3, 6, seed=30 + v) for v in range(4)]                 # 2 global + 2 local crops
    teachers = [rnd(3, 6, seed=40 + a) for a in range(2)]
    center = 0.3 * rnd(1, 6, seed=50, grad=False)
    out = dino_loss(students, teachers, center, ts, tt)
    assert_same(out, ref_dino(students, teachers, center[0], ts, tt), tuple(students))
    assert all(g is None for g in grads(out, tuple(teachers)))           # teacher: stop-gradient

def test_dino_center_matters_and_update():
    students, teachers = [rnd(3, 6, seed=60 + v) for v in range(2)], [rnd(3, 6, seed=70 + a, grad=False) for a in range(2)]
    c0 = torch.zeros(1, 6, dtype=D64)
    assert not torch.allclose(dino_loss(students, teachers, c0), dino_loss(students, teachers, c0 + rnd(1, 6, seed=1, grad=False)))
    assert torch.allclose(dino_loss(students, teachers, c0 + 5.0), dino_loss(students, teachers, c0))  # a constant shift cancels
    center = rnd(1, 6, seed=80, grad=False); before = center.clone()
    out = dino_center_update(center, teachers, momentum=0.8)
    assert out is center                                                 # in place (a registered buffer)
    assert torch.allclose(center, 0.8 * before + 0.2 * torch.cat(teachers).mean(0, keepdim=True))

# ---------------------------------------------------------------- memory bank
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_memory_bank_matches_loop(tau):
    z, bank, index = rnd(5, 6, seed=90), rnd(30, 6, seed=91), torch.tensor([0, 3, 29, 17, 8])
    negs = sample_negatives(index, 30, 7, torch.Generator().manual_seed(5))
    out = memory_bank_loss(z, index, bank, tau, 7, generator=torch.Generator().manual_seed(5))
    assert_same(out, ref_bank(z, index, bank, negs, tau), (z,))
    assert grads(out, (bank,)) == (None,)
    assert torch.equal(out, memory_bank_loss(z, index, bank, tau, negatives=negs))

def test_memory_bank_sampling():
    index = torch.arange(10)
    negs = sample_negatives(index, 10, 2000, torch.Generator().manual_seed(0))
    assert negs.shape == (10, 2000) and not (negs == index[:, None]).any()
    counts = torch.bincount(negs[0], minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 150                      # uniform over the other 9 (mean 222)
    z, bank = rnd(10, 4, seed=92), rnd(40, 4, seed=93)
    a = memory_bank_loss(z, index, bank, 0.1, 16, generator=torch.Generator().manual_seed(3))
    b = memory_bank_loss(z, index, bank, 0.1, 16, generator=torch.Generator().manual_seed(3))
    c = memory_bank_loss(z, index, bank, 0.1, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)                   # deterministic given the generator

def test_memory_bank_update():
    bank = F.normalize(rnd(12, 4, seed=94, grad=False), dim=1); old = bank.clone()
    z, index = rnd(3, 4, seed=95, grad=False), torch.tensor([2, 7, 11])
    memory_bank_update(bank, z, index, momentum=0.5)
    want = F.normalize(0.5 * old[index] + 0.5 * F.normalize(z, dim=1), dim=1)
    assert torch.allclose(bank[index], want)
    keep = torch.ones(12, dtype=torch.bool); keep[index] = False
    assert torch.equal(bank[keep], old[keep])

# ---------------------------------------------------------------- NNCLR
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nnclr_matches_loop(tau):
    z1, z2, support = rnd(5, 6, seed=100), rnd(5, 6, seed=101), rnd(20, 6, seed=102)
    out = nnclr_loss(z1, z2, support, tau)
    assert_same(out, ref_nnclr(z1, z2, support, tau), (z2,))
    assert grads(out, (z1, support)) == (None, None)

def test_nnclr_with_self_in_support_is_infonce():
    z1, z2 = rnd(5, 6, seed=103), rnd(5, 6, seed=104)
    support = torch.cat([rnd(10, 6, seed=105, grad=False), 7 * z1.detach()])
    nn, idx = nearest_neighbour(z1, support)
    assert torch.equal(idx, torch.arange(10, 15))
    logits = F.normalize(z1, dim=1).detach() @ F.normalize(z2, dim=1).T / 0.2
    assert torch.allclose(nnclr_loss(z1, z2, support, 0.2), F.cross_entropy(logits, torch.arange(5)))

# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("call", [
    lambda: nt_xent(torch.randn(4, 3), torch.randn(5, 3)),
    lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0),
    lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=-1.0),
    lambda: nt_xent(torch.randn(4), torch.randn(4)),
    lambda: contrastive_stats(torch.randn(4, 3), torch.randn(4, 2), 0.5),
    lambda: moco_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(8, 5)),
    lambda: byol_loss(torch.randn(4, 3), torch.randn(3, 3)),
    lambda: align_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 3)),
    lambda: uniformity(torch.randn(1, 3)),
    lambda: dino_loss(torch.randn(2, 3, 5), [torch.randn(3, 5)], torch.zeros(1, 5)),
    lambda: dino_loss([torch.randn(3, 5)], [torch.randn(3, 5)], torch.zeros(1, 5)),
    lambda: dino_loss([torch.randn(3, 5)] * 2, [torch.randn(3, 5)], torch.zeros(1, 4)),
    lambda: memory_bank_loss(torch.randn(4, 3), torch.arange(3), torch.randn(10, 3), 0.1, 5),
    lambda: memory_bank_loss(torch.randn(4, 3), torch.arange(4), torch.randn(10, 3), 0.1, 0),
    lambda: nnclr_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(10, 4), 0.1),
])
def test_bad_input_raises_config_error(call):
    with pytest.raises(ConfigError):
        call()
