"""The options the paper recipe (ContrastiveCrop's public code) needs, each against a naive reference:
SimCLR without projector BN and with a loss scale, BYOL's loss scale, SimSiam's fixed predictor lr, the
per-epoch lr schedule, and ContrastiveCrop's 'sum' heatmap box."""
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from attnssl.core import ConfigError
from attnssl.datasets import TensorDataset
from attnssl.methods import build_method
from attnssl.models import build_backbone
from attnssl.train import TrainConfig, Trainer

def _views(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)]

def test_simclr_projector_without_bn_and_loss_scale():
    torch.manual_seed(0); a = build_method("simclr", build_backbone("resnet18", width=2), proj_bn=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in a.projector.modules())
    assert [type(m) for m in a.projector] == [nn.Linear, nn.ReLU, nn.Linear] and a.projector[0].bias is not None
    torch.manual_seed(0); b = build_method("simclr", build_backbone("resnet18", width=2), proj_bn=False, loss_scale=0.5 / 0.07)
    v = _views()
    a.eval(); b.eval()
    assert torch.allclose(b(v)["loss"], a(v)["loss"] * 0.5 / 0.07)
    with pytest.raises(ConfigError, match="loss_scale"): build_method("simclr", build_backbone("resnet18", width=2), loss_scale=0)

def test_byol_loss_scale_two_equals_contrastive_crop_sum_of_directions():
    torch.manual_seed(0); m = build_method("byol", build_backbone("resnet18", width=2), loss_scale=2.0)
    m.eval(); v = _views(1)
    out = m(v)["loss"]
    # their code: loss = -2 * (cos(p1, z2).mean() + cos(p2, z1).mean()); equal up to the constant 4
    with torch.no_grad():
        z = [m.projector(m.backbone(x)) for x in v]; p = [m.predictor(x) for x in z]
        zt = [m.target_projector(m.target_backbone(x)) for x in v]
        theirs = -2 * (F.cosine_similarity(p[0], zt[1]).mean() + F.cosine_similarity(p[1], zt[0]).mean())
    assert out.item() == pytest.approx(theirs.item() + 4, abs=1e-5)

def _tiny_set(n=16):
    g = torch.Generator().manual_seed(0)
    return TensorDataset((torch.rand(n, 3, 16, 16, generator=g) * 255).to(torch.uint8), torch.arange(n) % 2,
                         classes=["a", "b"], mean=(0.5,) * 3, std=(0.25,) * 3)

class _Views:
    num_views, roles = 2, None
    def __call__(self, batch, epoch):
        x = (batch["image"].float() / 255 - 0.5) / 0.25; return [x, x.flip(-1)]
    def on_epoch_start(self, epoch, **kw): pass
    def state_dict(self): return {}
    def load_state_dict(self, s): pass

def _lrs(method, **cfg):
    lrs = []
    class Rec:
        def on_step_end(self, tr, out): lrs.append([g["lr"] for g in tr.optimizer.param_groups])
    t = Trainer(method, _Views(), _tiny_set(), TrainConfig(batch_size=4, device="cpu", progress=False, online_probe=False,
                                                           **cfg), callbacks=[Rec()])
    t.fit(); return lrs

def test_schedule_per_epoch_holds_the_lr_through_each_epoch():
    torch.manual_seed(0)
    lrs = [g[0] for g in _lrs(build_method("simclr", build_backbone("resnet18", width=2)), epochs=3, lr=0.5,
                              min_lr=0.05, schedule_per="epoch", optimizer="sgd")]
    # the lr logged after each step is the next step's: 4 steps per epoch, one value per epoch
    expect = [0.05 + 0.45 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    seen = [0.5] + lrs[:-1]                                    # lr used at each of the 12 steps
    assert seen == pytest.approx([expect[s // 4] for s in range(12)])
    with pytest.raises(ConfigError, match="schedule_per"): TrainConfig(schedule_per="week")

def test_simsiam_fix_pred_lr_keeps_the_predictor_at_the_peak():
    torch.manual_seed(0)
    m = build_method("simsiam", build_backbone("resnet18", width=2), fix_pred_lr=True)
    lrs = _lrs(m, epochs=2, lr=0.1, optimizer="sgd")
    assert all(step[-1] == 0.1 for step in lrs)                # the predictor's group: constant
    assert lrs[-1][0] < 0.01                                    # the rest: cosine towards 0

def test_contrastive_crop_sum_heatmap_equals_a_naive_loop():
    from attnssl.augment import Normalize, light_augment
    from attnssl.views import ContrastiveCropViews
    torch.manual_seed(0)
    fmap = torch.relu(torch.randn(3, 5, 4, 4))                # (N, C, h, w) as a ResNet's last map
    H = W = 32; k = 0.1
    cc = ContrastiveCropViews(light_augment(32), Normalize((0.5,) * 3, (0.5,) * 3), 3, 32, heatmap="sum", k=k)
    got = cc.update_boxes(torch.arange(3), fmap.sum(1, keepdim=True), (H, W))
    for i in range(3):                                          # their update_box, one image at a time
        m = fmap[i].sum(0); m = (m - m.min()) / (m.max() - m.min())
        up = F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
        rows = [r for r in range(H) if up[r].max() >= k]; cols = [c for c in range(W) if up[:, c].max() >= k]
        assert got[i].tolist() == pytest.approx([cols[0] / W, rows[0] / H, (cols[-1] + 1) / W, (rows[-1] + 1) / H])
    with pytest.raises(ConfigError, match="heatmap"):
        ContrastiveCropViews(light_augment(32), Normalize((0.5,) * 3, (0.5,) * 3), 3, 32, heatmap="max")

def test_feature_sum_source_is_the_channel_sum():
    from attnssl.attention import FeatureNormSource
    enc = build_backbone("resnet18", width=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = enc(x, return_map=True)[1]
        assert torch.allclose(FeatureNormSource(enc, reduce="sum").maps(x), fmap.sum(1, keepdim=True).clamp_min(0), atol=1e-5)
