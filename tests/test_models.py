"""Backbones, heads, EMA: shapes, out_dim, maps, EMA math and schedule, config errors."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from attnssl.core import ConfigError
from attnssl.models import (EMA, ResNet, ViT, build_backbone, cosine_momentum,
                            default_patch_size, mlp)

torch.set_num_threads(1)

SMALL = {"resnet18": dict(width=8), "resnet34": dict(width=4), "resnet50": dict(width=4),
         "vit_tiny": dict(depth=1), "vit_small": dict(depth=1), "vit": dict(embed_dim=32, depth=1, num_heads=2)}
OUT_DIM = {"resnet18": 64, "resnet34": 32, "resnet50": 128, "vit_tiny": 192, "vit_small": 384, "vit": 32}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("size", [32, 64, 96])
def test_backbone_shapes(name, size):
    torch.manual_seed(0)
    bb = build_backbone(name, **SMALL[name])
    assert bb.out_dim == OUT_DIM[name]
    x = torch.randn(2, 3, size, size)
    pooled = bb(x)
    assert pooled.shape == (2, bb.out_dim) and torch.isfinite(pooled).all()
    pooled2, fmap = bb(x, return_map=True)
    assert fmap.shape[:2] == (2, bb.out_dim)
    if name.startswith("resnet"):
        assert fmap.shape[-2:] == (size // 8, size // 8)          # small stem: three stride-2 stages
        assert torch.allclose(pooled2, fmap.mean(dim=(2, 3)), atol=1e-6)
    else:
        assert fmap.shape[-2:] == (size // 4, size // 4)          # default patch 4 at img_size 32
    bb.eval()
    assert torch.allclose(bb(x), bb(x, return_map=True)[0], atol=1e-5)


def test_resnet_stems_and_widths():
    x = torch.randn(2, 3, 64, 64)
    assert ResNet(18, width=8, stem="small")(x, return_map=True)[1].shape[-1] == 8
    assert ResNet(18, width=8, stem="imagenet")(x, return_map=True)[1].shape[-1] == 2   # /32
    assert ResNet(18, width=16).out_dim == 128 and ResNet(18).out_dim == 512
    assert ResNet(50).out_dim == 2048
    small = ResNet(18, width=8, stem="small")
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.modules())
    # full width, ImageNet stem = torchvision's ResNet-18 without the classifier
    n = sum(p.numel() for p in ResNet(18, stem="imagenet").parameters())
    assert n == 11_689_512 - 513_000


def test_resnet_zero_init_residual_and_grads():
    net = ResNet(18, width=4, zero_init_residual=True)
    assert all((b.bn2.weight == 0).all() for b in net.layer1)
    net = ResNet(18, width=4)
    net(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_vit_dynamic_size_patch_and_vit_attr():
    vit = build_backbone("vit_tiny", depth=1, img_size=64)
    assert vit.patch_size == 8 == default_patch_size(64) and default_patch_size(32) == 4
    from timm.models.vision_transformer import VisionTransformer
    assert isinstance(vit.vit, VisionTransformer) and vit.num_prefix_tokens == 1
    for s in (32, 48, 64, 96):
        pooled, fmap = vit(torch.randn(1, 3, s, s), return_map=True)
        assert fmap.shape == (1, 192, s // 8, s // 8)
    vit = build_backbone("vit", embed_dim=24, depth=1, num_heads=3, patch_size=4, img_size=32)
    assert vit.out_dim == 24 and len(vit.vit.blocks) == 1
    # the map is the patch tokens (not the CLS token) in row-major patch order
    x = torch.randn(1, 3, 32, 32)
    tokens = vit.vit.forward_features(x)
    _, fmap = vit(x, return_map=True)
    assert torch.allclose(fmap[0, :, 0, 1], tokens[0, 2]) and torch.allclose(fmap[0, :, 1, 0], tokens[0, 1 + 8])


def test_build_backbone_errors():
    with pytest.raises(ConfigError, match="resnet18.*vit_tiny|valid backbones"):
        build_backbone("resnet19")
    with pytest.raises(ConfigError, match="last_stride"):
        build_backbone("resnet18", widht=16)
    with pytest.raises(ConfigError, match="patch_size"):
        build_backbone("vit_tiny", patch=4)
    with pytest.raises(ConfigError):
        build_backbone("vit", embed_dim=30, num_heads=4, depth=1)
    with pytest.raises(ConfigError):
        ResNet(19)
    assert issubclass(ConfigError, ValueError)


def test_mlp_layouts():
    h = mlp(16, 32, 8)
    assert [type(m) for m in h] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert h[0].bias is None and h[3].bias is not None
    h = mlp(16, 32, 8, num_layers=3, bn_last=True)
    assert isinstance(h[-1], nn.BatchNorm1d) and not h[-1].affine and h[-2].bias is None
    assert [type(m) for m in mlp(16, 32, 8, num_layers=1)] == [nn.Linear]
    h = mlp(16, 32, 8, bn_hidden=False, act=nn.GELU)
    assert [type(m) for m in h] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp(16, 32, 8)(torch.randn(5, 16)).shape == (5, 8)
    with pytest.raises(ConfigError):
        mlp(4, 4, 4, num_layers=0)


def test_ema_update_math():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(online)
    target = ema.target
    assert target is not online and all(not p.requires_grad for p in target.parameters())
    for pt, po in zip(target.parameters(), online.parameters()):
        assert torch.equal(pt, po)
    with torch.no_grad():
        for p in online.parameters(): p.add_(torch.randn_like(p))
    online.train()(torch.randn(8, 4))                     # changes BN running stats
    old = [p.clone() for p in target.parameters()]
    ema.update(0.75)
    for pt, po, o in zip(target.parameters(), online.parameters(), old):
        assert torch.allclose(pt, 0.75 * o + 0.25 * po, atol=1e-6)
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    snap = [p.clone() for p in target.parameters()]
    ema.update(1.0)                                       # momentum 1: parameters frozen
    for pt, s in zip(target.parameters(), snap):
        assert torch.equal(pt, s)
    ema.update(0.0)                                       # momentum 0: a copy
    for pt, po in zip(target.parameters(), online.parameters()):
        assert torch.allclose(pt, po)
    # an explicitly given target is synchronised to the online weights
    t2 = copy.deepcopy(online); nn.init.zeros_(t2[0].weight)
    EMA(online, t2)
    assert torch.equal(t2[0].weight, online[0].weight)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.996, 0, 1000) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 1000, 1000) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 500, 1000) == pytest.approx(0.998)
    assert cosine_momentum(0.99, 2000, 1000) == pytest.approx(1.0)      # clamped past the end
    vals = [cosine_momentum(0.9, k, 50) for k in range(51)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert cosine_momentum(0.9, 3, 0) == 0.9
    assert EMA.cosine_momentum(0.5, 1, 2) == pytest.approx(0.75)
    assert math.isclose(cosine_momentum(0.0, 1, 4), 1 - (math.cos(math.pi / 4) + 1) / 2)
