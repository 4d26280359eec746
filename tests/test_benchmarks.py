"""benchmarks/short_run_knn.py and benchmarks/train_throughput.py: tiny runs end to end, their output, and bad input."""
import importlib.util, json
from pathlib import Path
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "short_run_knn.py"


def load():
    spec = importlib.util.spec_from_file_location("short_run_knn", SCRIPT)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod


def test_short_run_knn_appends_one_labelled_line(tmp_path):
    out = tmp_path / "runs.jsonl"
    args = ["--method", "simsiam", "--epochs", "2", "--images", "64", "--width", "4", "--knn-every", "1",
            "--augment", '{"p_gray": 1.0}', "--train", '{"batch_size": 32}', "--clutter", "0.5", "--out", str(out)]
    row = load().main(args)
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines == [row]
    assert [e for e, _ in row["knn"]] == [1, 2] and all(0 <= acc <= 100 for _, acc in row["knn"])
    assert 0 <= row["knn_init"] <= 100 and row["data"] == {"object_area": [0.2, 0.5], "clutter": 0.5, "images": 64}
    assert row["augment"] == {"p_gray": 1.0} and row["train"]["batch_size"] == 32 and row["commit"] and row["hardware"]


def test_short_run_knn_rejects_unknown_hyperparameter(tmp_path):
    with pytest.raises(Exception, match="valid"):
        load().main(["--method", "byol", "--epochs", "1", "--images", "32", "--hparams", '{"momentun": 0.9}',
                     "--out", str(tmp_path / "x.jsonl")])


def test_short_run_knn_backbone_override(tmp_path):
    "--backbone replaces the default encoder (here DINO on a tiny ResNet) and is recorded in the line."
    backbone = {"name": "resnet18", "width": 2, "stem": "small"}
    row = load().main(["--method", "dino", "--epochs", "1", "--images", "32", "--backbone", json.dumps(backbone),
                       "--hparams", '{"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "n_local": 2}',
                       "--train", '{"batch_size": 16}', "--out", str(tmp_path / "x.jsonl")])
    assert row["backbone"] == backbone and row["train"]["lr"] == 2e-3   # the ResNet defaults, not the ViT ones
    assert row["train"]["warmup_epochs"] == 1 and [e for e, _ in row["knn"]] == [1]   # 08_train's DINO warm-up


def test_short_run_knn_vit_backbone_gets_the_vit_recipe(tmp_path):
    backbone = {"name": "vit_tiny", "img_size": 32, "patch_size": 4, "depth": 1}
    row = load().main(["--method", "dino", "--epochs", "1", "--images", "32", "--backbone", json.dumps(backbone),
                       "--hparams", '{"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "n_local": 2}',
                       "--train", '{"batch_size": 16}', "--out", str(tmp_path / "x.jsonl")])
    assert row["train"]["lr"] == 5e-4 and row["train"]["weight_decay"] == 0.04


def test_short_run_knn_backbone_needs_a_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load().main(["--method", "simclr", "--backbone", '{"width": 8}', "--out", str(tmp_path / "x.jsonl")])
    assert '"name"' in capsys.readouterr().err


THROUGHPUT = Path(__file__).parents[1] / "benchmarks" / "train_throughput.py"


def load_throughput():
    spec = importlib.util.spec_from_file_location("train_throughput", THROUGHPUT)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod


def test_train_throughput_prints_method_beside_supervised(capsys):
    rows = load_throughput().main(["--widths", "2", "--images", "32", "--batch-size", "16", "--threads", "1", "--device", "cpu"])
    assert [r["width"] for r in rows] == [2] and rows[0]["method"] == "simclr"
    assert rows[0]["method_per_s"] > 0 and rows[0]["supervised_per_s"] > 0
    assert "supervised img/s" in capsys.readouterr().out


def test_train_throughput_sizes_the_memory_bank_to_the_data():
    rows = load_throughput().main(["--method", "memory_bank", "--widths", "2", "--images", "32", "--batch-size", "16",
                                   "--threads", "1", "--device", "cpu"])
    assert rows[0]["method"] == "memory_bank" and rows[0]["method_per_s"] > 0


@pytest.mark.parametrize("argv, message", [(["--epochs", "1"], "warms up"), (["--method", "dino"], "multi-crop"),
                                           (["--images", "8", "--batch-size", "16"], "at least")])
def test_train_throughput_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_throughput().main(argv)
    assert message in capsys.readouterr().err


def load_script(name):
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod


def test_gpu_throughput_runs_on_cpu_and_says_what_ran(capsys):
    "The GPU benchmark runs with tiny sizes on a CPU; CUDA-only settings are reported as what actually ran."
    rows = load_script("gpu_throughput").main(["--sizes", "16", "--width", "2", "--images", "32", "--batch-size", "16",
                                               "--variants", "fp32", "bf16-cl", "--device", "cpu"])
    assert [(r["size"], r["variant"], r["ran_as"]) for r in rows] == [(16, "fp32", "fp32"), (16, "bf16-cl", "fp32")]
    assert all(r["simclr_per_s"] > 0 and r["backbone_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "SimCLR img/s" in out and "backbone img/s" in out and "commit" in out


def test_gpu_throughput_bad_input():
    mod = load_script("gpu_throughput")
    with pytest.raises(SystemExit): mod.parse(["--epochs", "1"])
    with pytest.raises(SystemExit): mod.parse(["--images", "8", "--batch-size", "16"])
    with pytest.raises(SystemExit): mod.parse(["--variants", "fp16"])


def test_diagnose_benchmark_appends_one_labelled_line(tmp_path):
    "A tiny diagnosis run: validation kNN at init and after training, the factors recorded, one JSON line."
    out = tmp_path / "d.jsonl"
    row = load_script("diagnose_benchmark").main(["--views", "oracle", "--epochs", "1", "--images", "128", "--val-images", "32",
                                                  "--object-colour", "0", "--backbone", '{"width": 2}', "--out", str(out)])
    assert [json.loads(l) for l in out.read_text().splitlines()] == [row]
    assert row["views"] == "oracle" and row["data"]["object_colour"] == 0.0 and row["data"]["val_images"] == 32
    assert 0 <= row["knn_init"] <= 100 and [e for e, _ in row["knn"]] == [1] and row["commit"]
    with pytest.raises(SystemExit): load_script("diagnose_benchmark").main(["--images", "64", "--out", str(out)])

def test_view_weights_of_the_oracle_and_a_flat_map():
    "benchmarks/view_weights.py: an object mask as the map keeps the object only; a flat map keeps everything."
    import torch
    mod = load_script("view_weights")
    masks = torch.zeros(2, 1, 8, 8); masks[:, :, 2:4, 2:6] = 1                    # the object: 8 of 64 pixels
    oracle = mod.view_weights(masks, masks, 8, s=2.0, t=0.6, norm="max")
    assert oracle["weight on object"] == 100.0 and oracle["weight on background"] == 0.0 and oracle["mean weight"] == 12.5
    flat = mod.view_weights(torch.ones(2, 1, 4, 4), masks, 8, s=2.0, t=0.6, norm="max")
    assert flat["weight on background"] == 100.0 and flat["pixels at full weight"] == 100.0
    b, params = mod.profile_base("small")
    assert b["dataset"]["object_colour"] == 0.0 and params["vit_epochs"] == 10
