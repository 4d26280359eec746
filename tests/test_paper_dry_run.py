"""The `paper` path without a GPU or a download: `reproduce --profile paper-dry-run` runs the templates through the
paper profile's loaders, view generators, methods and evaluation protocol at toy sizes, on small files written
here in the official STL-10 / Tiny ImageNet / CIFAR-10 formats and as an image folder (eager and lazy).
Real datasets have no object masks: every template must run anyway (mask columns say "n/a (no masks)")."""
import json
from pathlib import Path
import pytest
from attnssl.cli import list_templates, reproduce
from official_formats import write_cifar10, write_image_folder, write_stl10, write_tiny_imagenet

ROOT = Path(__file__).resolve().parents[1]
IDS = list(list_templates(ROOT/"nbs"/"experiments"))
HALVES = {"first": IDS[:8], "second": IDS[8:]}
# the other datasets: the templates that touch what differs between datasets (attention without masks, every
# view generator with ContrastiveCrop's boxes, fine-tuning on a labelled subset)
FEW = ["E0", "E2", "E8"]

def _dry_run(tmp_path, data_root, ids, **set_params):
    out, runs = tmp_path/"reports", tmp_path/"runs"
    res = reproduce(profile="paper-dry-run", only=ids, data_root=str(data_root), out=out, runs_root=runs, log=None,
                    threads=1, set_params=set_params or None, strict=False)
    failed = {i: m.get("error", "") for i, m in res["experiments"].items() if m.get("status") != "ok"}
    assert not res["failed"] and not failed, failed
    for i in ids:
        meta = json.loads((out/i/"meta.json").read_text())
        assert meta["profile"] == "paper-dry-run" and meta["parameters"]["recipe"] == "paper"
        assert any((out/i).glob("*.md")) or any((out/i).glob("*.png")), f"{i} wrote no table or figure"
    return out, runs

@pytest.fixture(scope="module")
def stl_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stl10"); write_stl10(root, n_train=40, n_test=20, n_unl=24)
    return root

@pytest.mark.parametrize("half", list(HALVES))
def test_paper_dry_run_stl10_every_template(half, stl_root, tmp_path):
    out, runs = _dry_run(tmp_path, stl_root, HALVES[half])
    if "E0" in HALVES[half]:   # no masks: the mask columns say so instead of crashing
        table = (out/"E0"/"E0_vit_attention.md").read_text()
        assert "n/a (no masks)" in table
    configs = [json.loads(p.read_text()) for p in runs.glob("*/run_config.json")]
    assert configs and all(c["dataset"]["name"] == "stl10" and c["dataset"]["image_size"] == 96 for c in configs
                           if "dataset" in c)

def test_paper_dry_run_tiny_imagenet(tmp_path):
    root = tmp_path/"data"; write_tiny_imagenet(root, n_train=8, n_val=12)
    _dry_run(tmp_path, root, FEW, dataset="tiny-imagenet", image_size=64)

def test_paper_dry_run_cifar10(tmp_path):
    root = tmp_path/"data"; write_cifar10(root, n_per_batch=8, n_test=20)
    _dry_run(tmp_path, root, FEW, dataset="cifar10", image_size=32)

@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_paper_dry_run_image_folder(lazy, tmp_path, monkeypatch):
    root = write_image_folder(tmp_path/"folder", classes=("a", "b", "c"), n_per_class=10)
    # a memory budget of nothing makes the pipeline read the folder lazily (the kernels inherit the variable)
    monkeypatch.setenv("ATTNSSL_EAGER_MB", "0" if lazy else "1024")
    _dry_run(tmp_path, root, FEW, dataset="imagefolder", image_size=32)

def test_paper_dry_run_wrong_image_size_is_a_clear_error(stl_root):
    from attnssl import experiments as ex
    from attnssl.core import ConfigError
    cfg = ex.make_config(dataset="stl10", image_size=32, data_root=str(stl_root), recipe="paper", epochs=1)
    with pytest.raises(ConfigError, match="set image_size=96"): ex.build_datasets(cfg)
