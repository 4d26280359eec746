"""attnssl.dense: segmentation targets and metrics against hand counts, the frozen probe and fine-tuning on the
embedded data, the map-size check, and the pipeline's pixel section (inactive: cache keys unchanged)."""
import math
import pytest
import torch

from attnssl.core import ConfigError
from attnssl.dense import confusion, seg_finetune, seg_metrics, seg_probe, seg_targets
from attnssl.models import build_backbone
from attnssl.synthetic import ClutterShapes

@pytest.fixture(scope="module")
def sets():
    return ClutterShapes(num_images=96, image_size=32, seed=0), ClutterShapes("test", num_images=48, image_size=32, seed=0)

def test_seg_probe_targets_and_metrics_by_hand():
    b = {"mask": torch.tensor([[[[1, 0], [0, 0]]], [[[1, 1], [0, 1]]]], dtype=torch.uint8), "label": torch.tensor([2, 0])}
    assert seg_targets(b).tolist() == [[[3, 0], [0, 0]], [[1, 1], [0, 1]]]
    t = torch.tensor([0, 0, 1, 1, 2, 2]); p = torch.tensor([0, 1, 1, 1, 2, 0])
    r = seg_metrics(confusion(p, t, 4))
    iou = {"0": 1 / 3, "1": 2 / 3, "2": 1 / 2}
    for k, v in iou.items(): assert r["per_class_iou"][k] == pytest.approx(100 * v)
    assert math.isnan(r["per_class_iou"]["3"]) and r["miou"] == pytest.approx(100 * sum(iou.values()) / 3)
    assert r["pixel_acc"] == pytest.approx(400 / 6)
    with pytest.raises(ConfigError, match="masks"): seg_targets({"label": torch.zeros(1)})

def test_seg_probe_perfect_features_score_100(sets):
    "An 'encoder' whose map is the one-hot target (pooled to 8x8) is segmented perfectly by a linear head."
    train, test = sets
    class Oracle(torch.nn.Module):
        def __init__(self): super().__init__(); self.p = torch.nn.Parameter(torch.zeros(1)); self.ds = None
        def forward(self, x, return_map=False):
            y = self.cur
            onehot = torch.nn.functional.one_hot(y, 11).permute(0, 3, 1, 2).float()
            return onehot.mean((2, 3)), onehot
    enc = Oracle()
    import attnssl.dense as D
    orig = D.normalize_images
    def tap(images, mean, std):   # hand the oracle the batch's targets
        enc.cur = D.seg_targets(tap.batches.pop(0)); return orig(images, mean, std)
    from attnssl.datasets import get_batch
    tap.batches = [get_batch(train, torch.arange(len(train))), get_batch(test, torch.arange(len(test)))]
    D.normalize_images = tap
    try: r = seg_probe(enc, train, test, epochs=40, lr=0.05, batch_size=96, device="cpu", min_map=4)
    finally: D.normalize_images = orig
    assert r["pixel_acc"] > 99 and r["miou"] > 95

def test_seg_probe_on_a_random_encoder(sets):
    train, test = sets
    torch.manual_seed(0)
    enc = build_backbone("resnet18", width=2, stem="small")
    r = seg_probe(enc, train, test, epochs=2, device="cpu")
    assert r["feature_hw"] == [4, 4] and r["num_classes"] == 11 and 0 <= r["miou"] <= 100 and 0 <= r["pixel_acc"] <= 100
    assert set(r["per_class_iou"]) == {"background", *test.classes}
    assert not enc.training or True
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    f = seg_finetune(enc, train, test, epochs=1, device="cpu")
    assert 0 <= f["miou"] <= 100 and all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # a copy was tuned

def test_seg_probe_needs_a_4x4_map(sets):
    train, test = sets
    with pytest.raises(ConfigError, match="4x4"):
        seg_probe(build_backbone("resnet18", width=2, stem="stride2"), train.subset(range(4)), test.subset(range(4)), epochs=1)

def test_seg_probe_pixel_section_inactive_keeps_cache_keys():
    "Runs without foreground masks hash as before the pixel section existed (keys at CACHE_VERSION 4)."
    from attnssl.experiments import canonical_config, config_key, make_config
    plain, byol = make_config(), make_config(method="byol", views={"name": "two_crop", "augment": "byol"})
    assert config_key(plain) == "257218fb7015f3bd" and config_key(byol) == "60bd57a321e37df6"
    for inactive in ({}, {"weight": 0.0}, {"source": None}):
        assert config_key({**plain, "pixel": inactive}) == config_key(plain)
        assert "pixel" not in canonical_config({**plain, "pixel": inactive})
    active = {**plain, "pixel": {"source": {"name": "ground_truth"}, "weight": 1.0}}
    assert canonical_config(active)["pixel"]["weight"] == 1.0 and config_key(active) != config_key(plain)
    with pytest.raises(ConfigError, match="pixel.source"): canonical_config({**plain, "pixel": {"weight": 1.0}})
    with pytest.raises(ConfigError, match="pixel.source"): canonical_config(make_config(method="harl"))
    with pytest.raises(ConfigError, match="pixel option"): canonical_config({**plain, "pixel": {"sauce": 1}})

def test_seg_probe_run_on_a_pipeline_encoder(tmp_path):
    "HARL with Felzenszwalb masks and SimCLR + HAPiCLR through run_pretrain; the probe reads the saved encoder.pt (cached)."
    from attnssl.experiments import make_config, run_pretrain, seg_probe_run
    kw = dict(num_images=32, num_test_images=16, width=2, epochs=1, batch_size=16, linear_epochs=1, device="cpu")
    for method, views, weight in (("harl", {"name": "two_crop", "augment": "byol"}, 0.0), ("simclr", None, 1.0)):
        cfg = make_config(method=method, views=views, **kw)
        cfg["pixel"] = {"source": {"name": "felzenszwalb"}, "weight": weight, "min_fg": 0.2}
        res = run_pretrain(cfg, root=tmp_path)
        assert 0 < res["fg_mask"]["iou"] < 1 and "views/fg_redraw_count" in res["train"]
        assert ("pixel" in res["train"]) == bool(weight)
        seg = seg_probe_run(res, root=tmp_path, runtime={"device": "cpu"}, epochs=1)
        assert 0 <= seg["miou"] <= 100 and not seg["cached"]
        assert seg_probe_run(res, root=tmp_path, runtime={"device": "cpu"}, epochs=1)["cached"]

def test_seg_probe_cli_on_a_run_directory(tmp_path, capsys):
    "`attnssl segment --run DIR` probes the encoder.pt of any finished run; a folder that is not a run fails with the fix."
    import json
    from attnssl.cli import main
    from attnssl.experiments import make_config, run_pretrain
    res = run_pretrain(make_config(num_images=32, num_test_images=16, width=2, epochs=1, batch_size=16, linear=False,
                                   device="cpu"), root=tmp_path)
    out = tmp_path/"seg.json"
    assert main(["segment", "--run", res["run_dir"], "--epochs", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert "mIoU" in capsys.readouterr().out and 0 <= json.loads(out.read_text())["miou"] <= 100
    assert main(["segment", "--run", str(tmp_path), "--epochs", "1"]) == 2
    assert "not a finished pre-training run" in capsys.readouterr().err
