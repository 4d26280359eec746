"""Trainer-level DDP wiring on 2 CPU processes (gloo): one step on 2 ranks == one process on the concatenated batch.

BatchNorm computes statistics per rank, so a 2-rank step legitimately differs from a 1-process step on the
full batch; the backbone here uses GroupNorm and SimCLR's projector BatchNorm is swapped for Identity, so
the comparison tests exactly what the trainer does: sharded loading, gathered negatives, gradient averaging,
rank-0-only checkpoints and metrics.
"""
import json
import pytest
import torch
import torch.nn as nn

from attnssl.datasets import TensorDataset
from attnssl.distributed import launch_local
from attnssl.train import Trainer, TrainConfig

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


def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset((torch.rand(2 * B, 3, 8, 8, generator=g) * 255).to(torch.uint8), torch.arange(2 * B) % 3,
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
