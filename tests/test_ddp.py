"""Trainer-level DDP wiring on 2 CPU processes (gloo): one step on 2 ranks == one process on the concatenated batch.

BatchNorm computes statistics per rank, so a 2-rank step legitimately differs from a 1-process step on the
full batch. The first test uses GroupNorm and swaps SimCLR's projector BatchNorm for Identity, so the comparison
tests exactly what the trainer does: sharded loading, gathered negatives, gradient averaging, rank-0-only
checkpoints and metrics. `test_ddp_batchnorm*` keeps BatchNorm and compares with a one-process reference that
normalises each rank's slice on its own; `test_ddp_knn*` checks the sharded evaluation and
`test_ddp_resume*` a resumed 2-rank run.
"""
import copy
import json
import pytest
import torch
import torch.nn as nn

from attnssl.core import ConfigError
from attnssl.datasets import TensorDataset
from attnssl.distributed import launch_local
from attnssl.losses import nt_xent
from attnssl.train import Trainer, TrainConfig, build_optimizer

# fork: the children reuse the imported torch (spawn re-imports it: seconds of CPU per child)
FORK = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"

B = 6            # per-rank batch; global batch 12 = the whole dataset, so the run is exactly one step


class GNNet(nn.Module):
    "Backbone without batch statistics."
    def __init__(self, out_dim=16):
        super().__init__(); self.out_dim = out_dim
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, out_dim))
    def forward(self, x, return_map=False): return self.net(x)


def make_method():
    from attnssl.methods import build_method
    torch.manual_seed(0)
    m = build_method("simclr", GNNet(), temperature=0.5)
    for name, mod in list(m.named_modules()):                   # no batch statistics anywhere
        if isinstance(mod, nn.BatchNorm1d):
            parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
            setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    return m


class DetViews:
    "Deterministic views (identity and flip) that remember which dataset indices they saw."
    num_views = 2
    def __init__(self): self.seen = []
    def __call__(self, batch, epoch):
        self.seen.append(batch["index"].clone()); x = (batch["image"].float() / 255 - 0.5) / 0.25
        return [x, x.flip(-1)]
    def on_epoch_start(self, epoch, **kw): pass
    def state_dict(self): return {}
    def load_state_dict(self, s): pass


def data(n=2 * B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset((torch.rand(n, 3, 8, 8, generator=g) * 255).to(torch.uint8), torch.arange(n) % 3,
                         classes=["a", "b", "c"], mean=(0.5,) * 3, std=(0.25,) * 3)


def worker(out_dir):
    "Runs on each rank inside a gloo process group made by `launch_local`."
    res = {}
    class Capture:
        def on_after_backward(self, tr):
            res["grads"] = {n: p.grad.clone() for n, p in tr.method.named_parameters() if p.grad is not None}
        def on_step_end(self, tr, out): res["loss"] = out["loss"].detach().clone()
    views = DetViews()
    t = Trainer(make_method(), views, data(), TrainConfig(epochs=1, batch_size=2 * B, optimizer="sgd", lr=0.1,
                device="cpu", out_dir=out_dir, progress=False, online_probe=True), callbacks=[Capture()])
    t.fit()
    res.update(index=views.seen[0], world=t.world_size, rank=t.rank, weights=t.method.state_dict())
    return res


def test_two_ranks_equal_one_process_on_concatenated_batch(tmp_path):
    pytest.importorskip("attnssl.methods")
    outs = launch_local(worker, 2, (str(tmp_path),))
    assert [o["world"] for o in outs] == [2, 2] and [o["rank"] for o in outs] == [0, 1]
    idx = torch.cat([o["index"] for o in outs])
    assert sorted(idx.tolist()) == list(range(2 * B))           # disjoint shards covering the global batch
    # reference: one process, the concatenated batch, no gather
    m = make_method(); ds = data()
    x = (ds.get_batch(idx)["image"].float() / 255 - 0.5) / 0.25
    out = m([x, x.flip(-1)], ds.get_batch(idx)); out["loss"].backward()
    assert torch.allclose((outs[0]["loss"] + outs[1]["loss"]) / 2, out["loss"], atol=1e-6)
    for name, p in m.named_parameters():
        if p.grad is None: continue
        for o in outs: assert torch.allclose(o["grads"][name], p.grad, atol=1e-6), name
    w0, w1 = outs[0]["weights"], outs[1]["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)           # ranks stay in sync after the step
    lines = (tmp_path/"metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 0   # rank 0 only
    ck = torch.load(tmp_path/"last.pt", weights_only=False)
    assert all(torch.equal(ck["method"][k], w0[k]) for k in w0)


# ---------------------------------------------------------------------------------------------- BatchNorm
def bn_simclr():
    "SimCLR on the project's small ResNet: BatchNorm in the backbone and in the projector."
    from attnssl.methods import build_method
    from attnssl.models import build_backbone
    torch.manual_seed(0)
    return build_method("simclr", build_backbone("resnet18", width=4), temperature=0.5)


def bn_dino():
    "DINO on the same ResNet, BN in the head, last layer frozen for longer than the run."
    from attnssl.methods import build_method
    from attnssl.models import build_backbone
    torch.manual_seed(0)
    return build_method("dino", build_backbone("resnet18", width=4), out_dim=32, hidden_dim=16, bottleneck_dim=8,
                        use_bn_in_head=True, freeze_last_layer_steps=10)


def bn_cfg(**kw):
    return TrainConfig(**{**dict(epochs=1, batch_size=2 * B, optimizer="sgd", lr=0.1, weight_decay=1e-2, momentum=0.9,
                                 device="cpu", progress=False, online_probe=False), **kw})


def images(ds, idx):
    return (ds.get_batch(idx)["image"].float() / 255 - 0.5) / 0.25


def bn_worker():
    res = {}
    views = DetViews()
    t = Trainer(bn_simclr(), views, data(), bn_cfg())
    t.fit()
    res["simclr"] = {"index": views.seen[0], "weights": copy.deepcopy(t.method.state_dict())}
    none = {}
    class NoGrad:
        def on_after_backward(self, tr):
            none.update({n: p.grad is None for n, p in tr.method.named_parameters() if p.requires_grad})
    t = Trainer(bn_dino(), DetViews(), data(), bn_cfg(), callbacks=[NoGrad()])
    t.fit()
    res["dino"] = {"none": none, "weights": copy.deepcopy(t.method.state_dict())}
    try: Trainer(bn_simclr(), DetViews(), data(), bn_cfg(sync_bn=True)).setup()
    except ConfigError as e: res["sync_bn"] = str(e)
    return res


def test_ddp_batchnorm_step_matches_per_rank_reference():
    outs = launch_local(bn_worker, 2, start_method=FORK)
    ds = data()
    # SimCLR, one step: parameters equal on both ranks and equal to one process that normalises each rank's
    # slice with its own statistics (what BatchNorm does on each rank) and averages the gradients
    w0, w1 = outs[0]["simclr"]["weights"], outs[1]["simclr"]["weights"]
    m = bn_simclr(); init = copy.deepcopy(m)
    params = dict(m.named_parameters())
    assert all(torch.equal(w0[k], w1[k]) for k in params)
    xs = [images(ds, o["simclr"]["index"]) for o in outs]
    z = [torch.cat([m.projector(m.backbone(v)) for v in vs]) for vs in (xs, [x.flip(-1) for x in xs])]
    nt_xent(z[0], z[1], 0.5).backward()
    build_optimizer(m, bn_cfg()).step()
    for k, p in params.items():
        assert torch.allclose(w0[k], p.detach(), atol=1e-5), k
        assert not torch.equal(w0[k], init.state_dict()[k]), k                    # every parameter moved
    # running statistics: each rank's own, from its own slice of the batch
    for o, x in zip(outs, xs):
        ref = copy.deepcopy(init).train()
        for v in (x, x.flip(-1)): ref.projector(ref.backbone(v))
        for k, b in ref.named_buffers(): assert torch.allclose(o["simclr"]["weights"][k], b, atol=1e-6), k
    assert not torch.equal(w0["backbone.stem.1.running_mean"], w1["backbone.stem.1.running_mean"])
    # DINO with its last layer frozen: the parameters without gradient on one process have none on 2 ranks,
    # so weight decay and momentum leave the frozen layer exactly as it was
    d = bn_dino().train(); v0 = d.head.last_v.detach().clone()
    x = images(ds, torch.arange(2 * B))
    d([x, x.flip(-1)])["loss"].backward()
    single = {n: p.grad is None for n, p in d.named_parameters() if p.requires_grad}
    assert single["head.last_v"] and sum(single.values()) == 1
    for o in outs:
        assert o["dino"]["none"] == single
        assert torch.equal(o["dino"]["weights"]["head.last_v"], v0)
    assert all(torch.equal(outs[0]["dino"]["weights"][k], outs[1]["dino"]["weights"][k]) for k in dict(d.named_parameters()))
    assert all("sync_bn" in o["sync_bn"] and "CPU" in o["sync_bn"] for o in outs)   # SyncBatchNorm needs GPUs


# -------------------------------------------------------------------------------------------- sharded kNN
def knn_sets():
    return data(13, seed=1), data(7, seed=2)            # sizes that split unevenly over 2 ranks


def knn_results(shard):
    "Features and kNN with batches of 4 (13 = 4 batches, 7 = 2) and of 16 (one batch: rank 1 gets none)."
    from attnssl.evaluate import extract_features, knn_classify
    from attnssl.models import build_backbone
    torch.manual_seed(0); enc = build_backbone("resnet18", width=4)
    mem, test = knn_sets(); res = {}
    for bs in (4, 16):
        f = extract_features(enc, mem, bs, "cpu", shard=shard) + extract_features(enc, test, bs, "cpu", shard=shard)
        res[bs] = (*f, knn_classify(*f, k=5, chunk=3, shard=shard))        # 7 queries: chunks of 3, 3, 1
    return res


def knn_trainer():
    mem, test = knn_sets()
    return Trainer(bn_simclr(), DetViews(), mem, bn_cfg(batch_size=2, knn_k=5, eval_batch_size=4, online_probe=True), eval_sets=(mem, test))


def knn_worker():
    res = {"sharded": knn_results(True), "local": knn_results(False)}
    t = knn_trainer(); t.setup()
    if t.rank == 1:                                      # BN statistics that differ per rank: evaluate uses rank 0's
        for mod in t.method.modules():
            if isinstance(mod, nn.BatchNorm2d): mod.running_mean.add_(1.0)
    res["evaluate"] = t.evaluate()
    return res


def test_ddp_knn_sharded_equals_single_process():
    outs = launch_local(knn_worker, 2, start_method=FORK)
    threads = torch.get_num_threads(); torch.set_num_threads(1)     # the children's setting: the same kernels
    try:
        ref = knn_results(False)
        assert knn_results(True)[4][4] == ref[4][4]                  # shard=True on one process changes nothing
        t = knn_trainer(); t.setup(); ref_eval = t.evaluate()
    finally: torch.set_num_threads(threads)
    assert ref[4][0].shape == (13, 32) and ref[4][2].shape == (7, 32) and "probe_top1" in ref_eval
    for o in outs:
        for bs in (4, 16):
            got, local = o["sharded"][bs], o["local"][bs]
            assert all(torch.equal(a, b) for a, b in zip(got[:4], ref[bs][:4])), bs   # all rows, in order
            assert all(torch.equal(a, b) for a, b in zip(got[:4], local[:4])), bs
            assert got[4] == ref[bs][4] == local[4], bs
        assert o["evaluate"] == ref_eval


# ------------------------------------------------------------------------------------------------- resume
class RandViews(DetViews):
    "Random noise and flips from the global RNG: a resumed run must restore every rank's stream."
    def __call__(self, batch, epoch):
        x = (batch["image"].float() / 255 - 0.5) / 0.25
        flip = (torch.rand(len(x)) < 0.5).view(-1, 1, 1, 1)
        return [x, torch.where(flip, x.flip(-1), x) + 0.1 * torch.randn_like(x)]


def resume_run(out_dir, init_seed=0, **kw):
    from attnssl.methods import build_method
    from attnssl.models import build_backbone
    torch.manual_seed(init_seed)
    m = build_method("simclr", build_backbone("resnet18", width=4), temperature=0.5)
    mem, test = knn_sets()
    cfg = TrainConfig(**{**dict(epochs=2, batch_size=8, optimizer="sgd", lr=0.1, warmup_epochs=1, device="cpu",
                                progress=False, knn_k=5, out_dir=str(out_dir)), **kw})
    t = Trainer(m, RandViews(), data(24), cfg, eval_sets=(mem, test))
    t.fit()
    return {"method": copy.deepcopy(t.method.state_dict()), "optimizer": copy.deepcopy(t.optimizer.state_dict()),
            "step": t.step}


def resume_worker(root):
    full = resume_run(f"{root}/full")
    resume_run(f"{root}/part", stop_after_epochs=1)
    resumed = resume_run(f"{root}/part", init_seed=123)       # a different init: everything comes from last.pt
    return {"full": full, "resumed": resumed}


def test_ddp_resume_equals_uninterrupted(tmp_path):
    outs = launch_local(resume_worker, 2, (str(tmp_path),), start_method=FORK)
    for o in outs:
        a, b = o["full"], o["resumed"]
        assert a["step"] == b["step"] == 2 * 3
        assert a["method"].keys() == b["method"].keys() and all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    w0, w1 = outs[0]["full"]["method"], outs[1]["full"]["method"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)       # after the last evaluation every rank holds rank 0's state
    lines = {d: [json.loads(l) for l in (tmp_path/d/"metrics.jsonl").read_text().splitlines()] for d in ("full", "part")}
    drop = lambda l: {k: v for k, v in l.items() if k not in ("epoch_time", "samples_per_s")}
    assert [l["epoch"] for l in lines["part"]] == [0, 1] and "knn_top1" in lines["part"][1]
    assert [drop(l) for l in lines["full"]] == [drop(l) for l in lines["part"]]
    ca, cb = (torch.load(tmp_path/d/"last.pt", weights_only=False) for d in ("full", "part"))
    assert all(torch.equal(ca["method"][k], cb["method"][k]) for k in ca["method"])
    assert all(torch.equal(ca["probe"]["head"][k], cb["probe"]["head"][k]) for k in ca["probe"]["head"])
