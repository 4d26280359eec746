"""attnssl.evaluate: kNN vs a naive loop, top-5 rule, -1 exclusion, stratified subsets, linear evaluation, fine-tuning."""
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnssl.core import ConfigError
from attnssl.evaluate import (OnlineProbe, extract_features, finetune, knn_classify, linear_accuracy, linear_eval,
                              rrc_flip, stratified_subset, train_linear, tsne_embed)


def blobs(n, C, d=8, noise=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, d, generator=torch.Generator().manual_seed(123)) * 2
    y = torch.randint(0, C, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, d, generator=g), y


def naive_knn(trf, try_, tef, tey, k, T):
    "Textbook weighted kNN: for each query sort all cosine similarities, sum exp(s/T) per class over the top k."
    trf, tef = F.normalize(trf.double(), dim=1), F.normalize(tef.double(), dim=1)
    top1 = top5 = 0
    for q, y in zip(tef, tey):
        sims = sorted(((float(q @ t), int(c)) for t, c in zip(trf, try_)), key=lambda p: -p[0])[:k]
        votes = {}
        for s, c in sims: votes[c] = votes.get(c, 0.0) + math.exp(s / T)
        ranked = sorted(votes, key=lambda c: -votes[c])
        top1 += ranked[0] == int(y); top5 += int(y) in ranked[:5]
    return 100 * top1 / len(tey), 100 * top5 / len(tey)


@pytest.mark.parametrize("k", [1, 7, 50, 500])
def test_knn_matches_naive_loop(k):
    trf, try_ = blobs(150, 4, seed=0); tef, tey = blobs(40, 4, seed=1)
    r = knn_classify(trf, try_, tef, tey, k=k, temperature=0.1, chunk=16)
    assert r["top1"] == pytest.approx(naive_knn(trf, try_, tef, tey, k, 0.1)[0])
    assert "top5" not in r                                    # only 4 classes


def test_top5_only_with_more_than_10_classes():
    trf, try_ = blobs(300, 12, noise=2.5, seed=0); tef, tey = blobs(60, 12, noise=2.5, seed=1)
    r = knn_classify(trf, try_, tef, tey, k=30)
    n1, n5 = naive_knn(trf, try_, tef, tey, 30, 0.1)
    assert r["top1"] == pytest.approx(n1) and r["top5"] == pytest.approx(n5) and r["top5"] >= r["top1"]
    trf, try_ = blobs(100, 10, seed=0); tef, tey = blobs(30, 10, seed=1)
    assert "top5" not in knn_classify(trf, try_, tef, tey, k=10, num_classes=10)


def test_unlabelled_rows_are_excluded_not_fatal():
    trf, try_ = blobs(150, 4, seed=0); tef, tey = blobs(40, 4, seed=1)
    try_u, tey_u = try_.clone(), tey.clone(); try_u[:50] = -1; tey_u[:10] = -1
    r = knn_classify(trf, try_u, tef, tey_u, k=20)
    assert r["top1"] == pytest.approx(naive_knn(trf[50:], try_[50:], tef[10:], tey[10:], 20, 0.1)[0])
    with pytest.raises(ConfigError, match="-1"):
        knn_classify(trf, torch.full_like(try_, -1), tef, tey)
    head = train_linear(trf, try_u, 4, epochs=20, batch_size=32)
    assert linear_accuracy(head, tef, tey_u)["top1"] > 60


def test_stratified_subset_balanced_and_deterministic():
    labels = torch.arange(2000) % 10; labels[::9] = -1
    for frac in (0.01, 0.1):
        a = stratified_subset(labels, frac, seed=3)
        counts = torch.bincount(labels[a], minlength=10)
        assert (labels[a] >= 0).all() and counts.min() == counts.max() >= 1
        assert int(counts.sum()) == pytest.approx(frac * int((labels >= 0).sum()), rel=0.2)
        assert torch.equal(a, stratified_subset(labels, frac, seed=3))
        assert not torch.equal(a, stratified_subset(labels, frac, seed=4))
    with pytest.raises(ConfigError, match="label_fraction"):
        stratified_subset(labels, 0.0)


def test_linear_eval_beats_chance_on_separable_features():
    trf, try_ = blobs(400, 5, noise=0.5, seed=0); tef, tey = blobs(100, 5, noise=0.5, seed=1)
    head = train_linear(trf, try_, 5, epochs=30, batch_size=64)
    assert linear_accuracy(head, tef, tey)["top1"] > 80      # chance 20%
    probe = OnlineProbe(8, 5)
    for _ in range(150): probe.step(trf, try_)
    assert linear_accuracy(probe, tef, tey)["top1"] > 80


class ImageSet(torch.utils.data.Dataset):
    "Tiny in-memory dataset following the data contract: class = dominant colour."
    def __init__(self, n, seed, C=3):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % C; self.labels[::11] = -1
        base = torch.eye(3)[self.labels.clamp(min=0) % 3] * 180
        self.images = (base.view(n, 3, 1, 1) + torch.rand(n, 3, 12, 12, generator=g) * 70).to(torch.uint8)
        self.classes = [str(i) for i in range(C)]; self.num_classes = C; self.has_masks = False
        self.mean, self.std = (0.4, 0.4, 0.4), (0.3, 0.3, 0.3)
    def __len__(self): return len(self.labels)
    def __getitem__(self, i): return {"image": self.images[i], "index": i, "label": int(self.labels[i])}


class Enc(nn.Module):
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    def forward(self, x): return self.net(x)


def test_extract_features_eval_mode_no_grad_and_order():
    ds, enc = ImageSet(50, 0), Enc().train()
    f, y = extract_features(enc, ds, batch_size=16)
    assert f.shape == (50, 8) and torch.equal(y, ds.labels) and not f.requires_grad and enc.training
    x = (ds.images[:5].float() / 255 - 0.4) / 0.3
    with torch.no_grad(): ref = enc.eval()(x)
    assert torch.allclose(f[:5], ref, atol=1e-5)


def test_finetune_and_paper_probe_depend_on_seed_not_on_what_ran_before():
    "A cached result must not depend on the process's random state: the heads are drawn from `seed`."
    tr, te = ImageSet(120, 0), ImageSet(60, 1)
    def both(state):
        enc = Enc(); torch.manual_seed(state)          # Enc() seeds the global state itself: set it after
        ft = finetune(enc, tr, te, label_fraction=0.2, seed=3, epochs=2, batch_size=8)["top1"]
        enc = Enc(); torch.manual_seed(state + 1)
        lp = linear_eval(enc, tr, te, protocol="paper", epochs=2, batch_size=32, lr=0.5, milestones=(1,), seed=3)["top1"]
        return ft, lp
    assert both(0) == both(12345)


def test_linear_eval_and_finetune_end_to_end():
    tr, te = ImageSet(120, 0), ImageSet(60, 1)
    r = linear_eval(Enc(), tr, te, protocol="cpu", epochs=40, batch_size=32, seed=0)
    assert r["top1"] > 60 and "top5" not in r
    r = linear_eval(Enc(), tr, te, protocol="paper", epochs=3, batch_size=32, lr=0.5, milestones=(2,))
    assert 0 <= r["top1"] <= 100
    enc = Enc(); before = {k: v.clone() for k, v in enc.state_dict().items()}
    r = finetune(enc, tr, te, label_fraction=0.1, seed=0, epochs=3, batch_size=8)
    assert r["num_labelled"] == 3 * round(0.1 * int((tr.labels >= 0).sum()) / 3) and 0 <= r["top1"] <= 100
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())   # caller's encoder untouched
    with pytest.raises(ConfigError, match="protocol"):
        linear_eval(Enc(), tr, te, protocol="fast")


def test_rrc_flip_shapes_and_tsne():
    x = torch.rand(4, 3, 16, 16)
    assert rrc_flip(x, size=8, generator=torch.Generator().manual_seed(0)).shape == (4, 3, 8, 8)
    f, y = blobs(90, 3, noise=0.3)
    y[:5] = -1
    r = tsne_embed(f, y, perplexity=10, max_iter=250)
    assert r["embedding"].shape == (85, 2) and r["silhouette"] > 0.3
