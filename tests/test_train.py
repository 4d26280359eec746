"""attnssl.train: schedule, LARS, exact resume, NaN stop, metrics, config errors (tiny CPU runs with test doubles)."""
import dataclasses
import json
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnssl.core import ConfigError
from attnssl.datasets import TensorDataset
from attnssl.train import LARS, Trainer, TrainConfig, TrainingDiverged, build_optimizer, lr_factor, param_groups


class TinyNet(nn.Module):
    "Backbone double: conv + BatchNorm (so running buffers are part of the state) + pooled features."
    def __init__(self, out_dim=16):
        super().__init__(); self.out_dim = out_dim
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, out_dim))
    def forward(self, x): return self.net(x)


class ToyMethod(nn.Module):
    "Method double: InfoNCE on two views, an EMA target and a queue buffer (state that must survive resume)."
    name, num_views = "toy", 2
    def __init__(self, nan_at=None):
        super().__init__()
        self.backbone, self.proj = TinyNet(), nn.Linear(16, 8)
        self.target = nn.Linear(16, 8).requires_grad_(False)
        self.register_buffer("queue", torch.zeros(16, 8)); self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.nan_at, self.gather = nan_at, False
    def encode(self, x): return self.backbone(x)
    def forward(self, views, batch, roles=None):
        h = [self.backbone(v) for v in views]; z = [self.proj(x) for x in h]
        a, b = F.normalize(z[0], dim=1), F.normalize(z[1], dim=1)
        loss = F.cross_entropy(a @ b.T / 0.5, torch.arange(len(a)))
        with torch.no_grad(): self._k = F.normalize(self.target(h[1]), dim=1)
        if self.nan_at is not None and int(self.steps) == self.nan_at: loss = loss * float("nan")
        return {"loss": loss, "z": z, "h0": h[0], "p_pos": float("nan"), "s_pos": (a * b).sum(1).mean().detach(),
                "s_neg": torch.tensor(0.1)}
    @torch.no_grad()
    def on_step_end(self, step, total_steps):
        for t, o in zip(self.target.parameters(), self.proj.parameters()): t.lerp_(o, 0.01)
        n = min(len(self._k), len(self.queue)); i = int(self.ptr)
        self.queue[i:i + n] = self._k[:n]; self.ptr.fill_((i + n) % len(self.queue)); self.steps += 1


class ToyViews:
    "View-generator double: random noise and flips (uses the global RNG, so resume must restore it); keeps a counter."
    num_views = 2
    def __init__(self): self.calls, self.epochs_seen = 0, []
    def __call__(self, batch, epoch):
        x = batch["image"].float() / 255; self.calls += 1
        flip = torch.rand(len(x)) < 0.5
        v2 = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x) + 0.1 * torch.randn_like(x)
        return [(x - 0.5) / 0.25, (v2 - 0.5) / 0.25]
    def on_epoch_start(self, epoch, *, encoder=None, dataset=None):
        assert isinstance(encoder, nn.Module) and dataset is not None   # the method's backbone and the training set
        self.epochs_seen.append(epoch)
    def state_dict(self): return {"calls": self.calls}
    def load_state_dict(self, state): self.calls = state["calls"]


def toy_data(n=64, seed=0, C=4):
    g = torch.Generator().manual_seed(seed); y = torch.arange(n) % C
    y[::13] = -1                                                  # some unlabelled images
    cols = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])
    img = (cols[y.clamp(min=0)].view(n, 3, 1, 1) * (0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g))
           + torch.rand(n, 3, 12, 12, generator=g) * 50).clamp(0, 255).to(torch.uint8)
    return TensorDataset(img, y, classes=[str(c) for c in range(C)], mean=(0.4,) * 3, std=(0.25,) * 3)


def cfg(out_dir, **kw):
    base = dict(epochs=3, batch_size=16, lr=0.1, optimizer="lars", warmup_epochs=1, out_dir=str(out_dir) if out_dir else None, device="cpu",
                progress=False, knn_k=10, seed=0)
    return TrainConfig(**{**base, **kw})


def run(out_dir, init_seed=0, eval_sets=True, **kw):
    torch.manual_seed(init_seed); m = ToyMethod(kw.pop("nan_at", None)); v = ToyViews()
    t = Trainer(m, v, toy_data(), cfg(out_dir, **kw), eval_sets=(toy_data(), toy_data(32, 1)) if eval_sets else None)
    return t, t.fit()


def test_resume_is_bit_identical(tmp_path):
    full, _ = run(tmp_path/"full")
    part, _ = run(tmp_path/"part", stop_after_epochs=2)
    assert part.epoch == 2 and torch.load(tmp_path/"part"/"last.pt", weights_only=False)["epoch"] == 2
    resumed, final = run(tmp_path/"part", init_seed=123)          # different init: everything comes from last.pt
    assert resumed.epoch == 3 and resumed.views.epochs_seen == [2] and resumed.views.calls == full.views.calls
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"]) for k in oa)
    pa, pb = full.probe.state_dict(), resumed.probe.state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    lines = [json.loads(l) for l in (tmp_path/"part"/"metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1, 2] and lines[-1]["loss"] == final["loss"]
    ck = torch.load(tmp_path/"part"/"last.pt", weights_only=False)
    assert {"method", "optimizer", "scheduler", "probe", "views", "scaler", "rng", "epoch", "step"} <= ck.keys()
    assert ck["step"] == 3 * 4 and ck["views"] == {"calls": full.views.calls}
    again, _ = run(tmp_path/"part")                                # finished run: nothing left to do
    assert again.step == ck["step"]


def test_metrics_lines(tmp_path):
    t, final = run(tmp_path, epochs=2, optimizer="sgd", knn_every=2)
    lines = [json.loads(l) for l in (tmp_path/"metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and "knn_top1" not in lines[0] and "knn_top1" in lines[1] and "probe_top1" in lines[1]
    for key in ("loss", "s_pos", "s_neg", "uniformity", "lr", "epoch_time", "samples_per_s", "probe_train_acc"):
        assert math.isfinite(lines[-1][key]), key
    assert lines[-1]["p_pos"] is None                              # NaN diagnostics are written as null
    assert lines[0]["s_neg"] == pytest.approx(0.1) and 0 <= final["knn_top1"] <= 100
    assert (tmp_path/"config.json").exists() and (tmp_path/"last.pt").exists()


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_checkpoint(tmp_path):
    # 64 images / batch 16 = 4 steps per epoch; step 6 is epoch 1, step 2 of that epoch
    with pytest.raises(TrainingDiverged, match=r"epoch 1 .*step 2 .*global step 6"):
        run(tmp_path, nan_at=6, eval_sets=False)
    ck = torch.load(tmp_path/"last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["method"].values() if v.is_floating_point())


def test_lr_schedule_per_step(tmp_path):
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == 1.0
    assert lr_factor(55, 100, 10) == pytest.approx(0.5) and lr_factor(99, 100, 10, min_ratio=0.1) > 0.1
    assert lr_factor(80, 100, 10, "constant") == 1.0
    lrs = []
    class Rec:
        def on_step_end(self, tr, out): lrs.append(tr.optimizer.param_groups[0]["lr"])
    torch.manual_seed(0)
    t = Trainer(ToyMethod(), ToyViews(), toy_data(), cfg(None, epochs=2, lr=0.2, optimizer="adamw", online_probe=False),
                callbacks=[Rec()])
    t.fit()                                                        # 8 steps, 4 of warm-up
    expected = [0.2 * lr_factor(s + 1, 8, 4) for s in range(8)]
    assert lrs == pytest.approx(expected) and t.probe is None


def test_lars_trust_ratio_and_exclusions():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = param_groups(m, 1e-2, exclude_1d=True)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0
    opt = LARS(groups, lr=0.5, momentum=0.0, weight_decay=1e-2, eta=0.02)
    for p in m.parameters(): p.grad = torch.randn_like(p)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    w, g = before["0.weight"], grads["0.weight"] + 1e-2 * before["0.weight"]
    expect = w - 0.5 * 0.02 * w.norm() / g.norm() * g
    assert torch.allclose(m[0].weight, expect, atol=1e-6)
    for n in ("0.bias", "1.weight", "1.bias"):                     # plain SGD, no decay, no trust ratio
        assert torch.allclose(dict(m.named_parameters())[n], before[n] - 0.5 * grads[n])
    c = TrainConfig(optimizer="adamw", weight_decay=0.05)
    groups = build_optimizer(m, c).param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


def test_bad_config_names_the_fix():
    with pytest.raises(ConfigError, match="optimizer"): TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="valid TrainConfig fields"): TrainConfig.from_dict({"lr_warmup": 1})
    with pytest.raises(ConfigError, match="eval_sets"):
        Trainer(ToyMethod(), ToyViews(), toy_data(), cfg(None), eval_sets=[1, 2, 3])
    t = Trainer(ToyMethod(), ToyViews(), toy_data(8), cfg(None))
    with pytest.raises(ConfigError, match="batch"): t.fit()


class _RoleRecorder(ToyMethod):
    "ToyMethod that records the roles the trainer hands it."
    def __init__(self): super().__init__(); self.seen = []
    def forward(self, views, batch, roles=None):
        self.seen.append(roles); return super().forward(views, batch)


class _RoleViews(ToyViews):
    "ToyViews that say what their views are; the attention view from epoch 1 on."
    def view_roles(self, epoch=0): return ("augmented", "attention") if epoch >= 1 else ("augmented", "augmented")


def test_trainer_passes_view_roles_and_logs_loss_method(tmp_path):
    method = _RoleRecorder()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, device="cpu", online_probe=False, progress=False,
                      out_dir=str(tmp_path), precision="fp32")
    Trainer(method, _RoleViews(), toy_data(32), cfg).fit()
    assert set(method.seen[:2]) == {("augmented", "augmented")} and set(method.seen[2:]) == {("augmented", "attention")}
    rows = [json.loads(l) for l in (tmp_path/"metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_method"] == r["loss"] for r in rows)          # an unwrapped method: its loss is the loss
    assert "target" not in {f.name for f in dataclasses.fields(TrainConfig)}   # the index knob is gone: roles decide


def _scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(log_dir)); ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_tensorboard_logger_writes_the_metrics_and_purges_what_a_resume_redoes(tmp_path):
    pytest.importorskip("tensorboard")
    from attnssl.train import TensorBoardLogger
    def fit(epochs, **kw):
        torch.manual_seed(0); tb = TensorBoardLogger(tmp_path/"tb", every=2)
        t = Trainer(ToyMethod(), ToyViews(), toy_data(), cfg(tmp_path/"run", epochs=epochs, **kw),
                    eval_sets=(toy_data(), toy_data(32, 1)), callbacks=[tb])
        final = t.fit(); tb.close(); return t, final
    t, final = fit(3, stop_after_epochs=2)                       # 4 steps per epoch; stops after step 8
    assert [s for s, _ in _scalars(tmp_path/"tb", "train/loss")] == [2, 4, 6, 8]
    knn = _scalars(tmp_path/"tb", "epoch/knn_top1")
    assert [s for s, _ in knn] == [4, 8] and knn[-1][1] == pytest.approx(final["knn_top1"], abs=1e-4)
    lines = [json.loads(l) for l in (tmp_path/"run"/"metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in _scalars(tmp_path/"tb", "epoch/loss")] == pytest.approx([l["loss"] for l in lines], abs=1e-5)
    from torch.utils.tensorboard import SummaryWriter           # a crashed epoch that logged past the checkpoint
    with SummaryWriter(str(tmp_path/"tb")) as w: w.add_scalar("train/loss", 99.0, 10)
    fit(3)                                                       # resumes at step 8: the stray point is purged
    assert _scalars(tmp_path/"tb", "train/loss") == [(s, v) for s, v in _scalars(tmp_path/"tb", "train/loss") if v != 99.0]
    assert [s for s, _ in _scalars(tmp_path/"tb", "train/loss")] == [2, 4, 6, 8, 10, 12]
    with pytest.raises(ConfigError, match="every"): TensorBoardLogger(tmp_path, every=0)
