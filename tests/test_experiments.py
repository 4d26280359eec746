"""The run cache: reuse without re-running, interrupted runs never read as results, the lock."""
import json, os, re, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
import torch
from attnssl.core import ConfigError
from attnssl.experiments import (DEFAULT_CONFIG, RunLocked, cached_run, canonical_config, config_key, load_result,
                                 override, run_dir, run_lock, runs_root)

def fake(calls):
    def fn(cfg, d):
        calls.append(cfg["seed"])
        (d/"last.pt").write_text(str(len(calls)))
        if cfg["train"].get("crash"): raise RuntimeError("killed")
        return {"knn_top1": 0.25 + cfg["seed"], "resumed_from": (d/"last.pt").read_text()}
    return fn

def test_key_canonical():
    assert config_key({}) == config_key(DEFAULT_CONFIG)
    assert config_key({"runtime": {"device": "cpu", "data_root": "/x"}}) == config_key({})
    assert config_key(override({}, {"train.lr": 1})) == config_key(override({}, {"train.lr": 1.0}))
    assert config_key({"seed": 1}) != config_key({"seed": 0})
    assert config_key(override({}, {"views.name": "attention"})) != config_key({})
    # key order does not matter
    c = override({}, {"method.temperature": 0.2, "method.name": "simclr"})
    c2 = {"method": {"name": "simclr", "temperature": 0.2}}
    assert config_key(c) == config_key(c2)

def test_bad_config():
    with pytest.raises(ConfigError, match="valid config sections"): canonical_config({"trian": {}})
    with pytest.raises(ConfigError, match="runtime"): canonical_config({"runtime": {"gpu": 1}})
    with pytest.raises(ConfigError): canonical_config({"seed": "zero"})

def test_reuse_no_rerun(tmp_path):
    calls = []
    r1 = cached_run({"seed": 3}, fake(calls), root=tmp_path)
    r2 = cached_run({"seed": 3, "runtime": {"device": "cpu"}}, fake(calls), root=tmp_path)
    assert calls == [3] and r1["cached"] is False and r2["cached"] is True
    assert r2["knn_top1"] == r1["knn_top1"] == 3.25
    assert set(r1["cost"]) >= {"wall_s", "peak_cpu_mb", "peak_gpu_mb", "device"}
    assert r1["config"]["seed"] == 3 and r1["key"] == config_key({"seed": 3})
    d = run_dir({"seed": 3}, tmp_path)
    assert json.loads((d/"run_config.json").read_text())["seed"] == 3 and not (d/"lock").exists()

def test_interrupted_run_is_resumed_not_read(tmp_path):
    calls, cfg = [], {"seed": 1, "train": {"crash": True}}
    with pytest.raises(RuntimeError): cached_run(cfg, fake(calls), root=tmp_path)
    d = run_dir(cfg, tmp_path)
    assert d.exists() and load_result(d) is None and not (d/"lock").exists()
    calls2 = []
    def finish(c, dd):  # the "trainer" sees the checkpoint left behind
        calls2.append(1); return {"resumed_from": (dd/"last.pt").read_text()}
    r = cached_run(cfg, finish, root=tmp_path)
    assert calls2 == [1] and r["resumed_from"] == "1" and r["cost"]["resumed"] is True
    assert load_result(d)["resumed_from"] == "1"

def test_result_written_last(tmp_path):
    seen = {}
    def fn(c, d):
        seen["during"] = (d/"result.json").exists(); return {}
    cached_run({}, fn, root=tmp_path)
    assert seen["during"] is False and load_result(run_dir({}, tmp_path)) is not None

def test_runs_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSSL_RUNS", str(tmp_path/"r"))
    assert runs_root() == (tmp_path/"r").resolve() and (tmp_path/"r").is_dir()
    assert runs_root(tmp_path/"x") == (tmp_path/"x").resolve()

HOLDER = textwrap.dedent("""
    import sys, time
    from attnssl.experiments import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True); time.sleep(60)
""")

def test_lock_live_then_stale(tmp_path):
    d = tmp_path/"run"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match="being run by pid"):
            with run_lock(d, wait=False): pass
        with pytest.raises(RunLocked):
            with run_lock(d, timeout=0.3, poll=0.1): pass
        p.send_signal(signal.SIGKILL); p.wait()
        assert (d/"lock").exists()  # the dead holder left its lock behind
        with run_lock(d, wait=False): pass  # stale: broken and taken
        assert not (d/"lock").exists() and not list(d.glob("lock.stale.*"))
    finally:
        if p.poll() is None: p.kill(); p.wait()

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from attnssl.experiments import cached_run
    def fn(cfg, d):
        with open(Path(sys.argv[1]).parent/"calls.txt", "a") as f: f.write("x")
        time.sleep(1.0); return {"v": 1}
    r = cached_run({"seed": 7}, fn, root=sys.argv[1])
    print(r["v"], r["cached"])
""")

def test_two_processes_train_once(tmp_path):
    root = tmp_path/"runs"
    ps = [subprocess.Popen([sys.executable, "-c", WORKER, str(root)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in ps)
    assert (tmp_path/"calls.txt").read_text() == "x"
    assert outs == ["1 False", "1 True"]

@pytest.mark.parametrize("method", ["memory_bank", "moco_v1"])
def test_real_tiny_run_of_a_method(method, tmp_path):
    "A real (tiny) pretrain + kNN through the cache; the memory bank gets one slot per SSL image from the config."
    from attnssl.experiments import make_config, run_pretrain
    cfg = make_config(num_images=32, num_test_images=16, width=2, epochs=1, batch_size=16, linear=False, knn_k=5,
                      method=method, method_kw={"queue_size": 64} if method == "moco_v1" else {}, device="cpu")
    res = run_pretrain(cfg, root=tmp_path)
    assert 0 <= res["knn_top1"] <= 100 and (Path(res["run_dir"])/"encoder.pt").exists()

def test_dataset_knobs_in_config():
    from attnssl.experiments import build_datasets, make_config
    default = make_config()
    assert "clutter" not in default["dataset"] and "object_area" not in default["dataset"]   # default keys unchanged
    assert config_key(make_config(clutter=1.0, object_area=(0.05, 0.4))) == config_key(default)
    easy = make_config(num_images=12, num_test_images=6, clutter=0.5, object_area=[0.2, 0.5])
    assert easy["dataset"]["clutter"] == 0.5 and easy["dataset"]["object_area"] == [0.2, 0.5]
    assert config_key(easy) != config_key(make_config(num_images=12, num_test_images=6))
    sets = build_datasets(easy)
    assert sets["ssl"].clutter == 0.5 and sets["test"].object_area == (0.2, 0.5) and len(sets["test"]) == 6
    with pytest.raises(ConfigError, match="clutter must be"): make_config(clutter=3)
    with pytest.raises(ConfigError, match="embedded dataset"): make_config(dataset="stl10", object_area=[0.2, 0.5])

def test_cache_key_dedup_same_training_one_key():
    "Options that change nothing about training do not change the key: the same run under two tables trains once."
    from attnssl.experiments import attention_views, make_config, vit_source
    base = make_config(recipe="cpu")
    # no align term: its target is irrelevant
    assert config_key(override(base, {"align.target": "symmetric"})) == config_key(base)
    assert config_key(override(base, {"align.lam": 1.0, "align.target": "symmetric"})) != config_key(override(base, {"align.lam": 1.0}))
    # the full-image control has no mask: its source and map options are irrelevant
    full_a = override(base, {"views": attention_views(vit_source(base, recipe="cpu"), mode="full")})
    full_b = override(base, {"views": attention_views(None, mode="full", s=4.0)})
    assert config_key(full_a) == config_key(full_b)
    # a method section given in full or by its recipe hashes alike
    from attnssl.experiments import method_section
    assert config_key(override(base, {"method": method_section("simclr", "cpu")})) == config_key(base)

def test_cache_key_dedup_other_builder_replaces_section():
    "An arm that names another method replaces the base's method section (no stray hyperparameters)."
    from attnssl.experiments import make_config, method_section
    base = make_config(recipe="cpu")                      # simclr with the recipe's temperature
    byol = override(base, {"method": method_section("byol", "cpu")})
    assert byol["method"] == {"name": "byol", "momentum": 0.99}

def test_recipe_resolution_and_errors(tmp_path):
    from attnssl.experiments import load_recipe, make_config, vit_source
    r = load_recipe("cpu")
    assert r["backbone"]["stem"] == "stride2" and r["train"]["optimizer"] == "adamw" and r["methods"]["moco_v2"]["queue_size"] == 1024
    cfg = make_config(recipe="cpu", lr=0.01)              # a given parameter wins over the recipe
    assert cfg["train"]["lr"] == 0.01 and cfg["train"]["optimizer"] == "adamw" and cfg["backbone"]["last_stride"] == 1
    assert make_config()["train"]["optimizer"] == "sgd"   # no recipe: the builders' defaults
    assert vit_source(cfg, recipe="cpu", epochs=3)["pretrain"]["backbone"]["embed_dim"] == r["vit"]["embed_dim"]
    spec = vit_source(cfg, recipe="cpu", epochs=3)           # the recipe's readout goes to the source, not the run
    assert (spec["block"], spec["heads"]) == (r["vit"]["block"], r["vit"]["heads"]) and "block" not in spec["pretrain"]["backbone"]
    assert vit_source(cfg, recipe="cpu", block=-1)["block"] == -1 and "block" not in vit_source(cfg, recipe=None)
    with pytest.raises(ConfigError, match="pass block="): vit_source(cfg, recipe="cpu", depth=1)
    with pytest.raises(ConfigError, match="valid recipes are: .*cpu"): load_recipe("gpu-fast")
    bad = tmp_path/"recipes.yaml"; bad.write_text("x:\n  extends: y\ny:\n  extends: x\n")
    with pytest.raises(ConfigError, match="extends itself"): load_recipe("x", bad)
    bad.write_text("x:\n  optimiser: {}\n")
    with pytest.raises(ConfigError, match="optimiser"): load_recipe("x", bad)

def test_validation_split_is_carved_from_training_images():
    from attnssl.experiments import build_datasets, make_config
    sets = build_datasets(make_config(num_images=40, num_test_images=8, num_val_images=10))
    assert len(sets["train"]) == 40 and len(sets["val"]) == 10 and sets["ssl"] is sets["train"]
    from attnssl.synthetic import ClutterShapes
    drawn = ClutterShapes("train", num_images=50)          # the same draw: val = the 10 images after the first 40
    assert torch.equal(sets["val"].images, drawn.images[40:]) and torch.equal(sets["train"].images, drawn.images[:40])
    assert build_datasets(make_config(num_images=40, num_test_images=8))["val"] is None

def test_short_run_metrics_are_pinned(tmp_path):
    """A fixed-seed tiny run (no cache reuse: a fresh root) gives the same metrics as when this test was written:
    a silent change to what training does fails here (then bump CACHE_VERSION and update the numbers)."""
    from attnssl.experiments import make_config, run_pretrain
    torch.set_num_threads(1)
    cfg = make_config(num_images=64, num_test_images=32, num_val_images=16, width=2, epochs=2, batch_size=32,
                      linear_epochs=2, knn_k=5, recipe="cpu", device="cpu")
    res = run_pretrain(cfg, root=tmp_path)
    assert not res["cached"]
    got = {k: round(res[k], 1) for k in ("knn_top1", "val_knn_top1", "linear_top1")}
    assert got == {k: v for k, v in PINNED.items() if k != "loss"}, got
    assert res["train"]["loss"] == pytest.approx(PINNED["loss"], abs=2e-3), res["train"]["loss"]

PINNED = {"knn_top1": 3.1, "val_knn_top1": 25.0, "linear_top1": 9.4, "loss": 4.442}   # unchanged since CACHE_VERSION 2

# ---------------------------------------------------------------- the paper recipe, pinned (a change shows in review)

PAPER_TRAIN = {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 0,
               "schedule": "cosine", "schedule_per": "epoch", "min_lr": 0.05}
PAPER_METHODS = {
    "simclr": {"temperature": 0.5, "proj_dim": 128, "proj_bn": False, "loss_scale": 7.142857142857143},   # 0.5 / 0.07
    "moco_v2": {"queue_size": 65536, "momentum": 0.999, "temperature": 0.2, "proj_dim": 128},
    "moco_v1": {"queue_size": 65536, "momentum": 0.999},
    "byol": {"momentum": 0.996, "momentum_schedule": "constant", "proj_dim": 128, "loss_scale": 2.0},
    "simsiam": {"fix_pred_lr": True, "backbone": {"zero_init_residual": True}},
}
PAPER_NORMALIZE = {"stl10": ([0.4406, 0.4273, 0.3858], [0.2312, 0.2265, 0.2237]),
                   "tiny-imagenet": ([0.4802, 0.4481, 0.3975], [0.2302, 0.2265, 0.2262]),
                   "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
                   "cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])}


def test_paper_recipe_is_pinned_with_a_source_for_every_value():
    from attnssl.experiments import load_recipe, make_config, method_section, views_section
    r = load_recipe("paper")
    assert r["train"] == PAPER_TRAIN and r["backbone"] == {"stem": "small", "last_stride": 2}
    assert r["methods"] == PAPER_METHODS
    assert r["views"] == {"contrastive_crop": {"alpha": 0.1, "k": 0.1, "heatmap": "sum", "crop_scale": [0.2, 1.0]}}
    assert {k: (v["mean"], v["std"]) for k, v in r["normalize"].items()} == PAPER_NORMALIZE
    # every value has a source: a line of ContrastiveCrop's code, or "ours"
    leaves = {f"backbone.{k}" for k in r["backbone"]} | {f"train.{k}" for k in r["train"]} | \
             {f"methods.{m}.{k}" for m, hp in r["methods"].items() for k in hp} | \
             {f"views.{v}.{k}" for v, o in r["views"].items() for k in o} | {f"normalize.{d}" for d in r["normalize"]} | \
             {f"vit.{k}" for k in r["vit"]}
    assert leaves == set(r["sources"]), leaves ^ set(r["sources"])
    assert all(s.startswith("ours") or re.search(r"\.py\b", s) for s in r["sources"].values()), r["sources"]
    # resolved into a run config
    cfg = make_config(dataset="stl10", image_size=96, recipe="paper", method="byol", epochs=500, batch_size=512,
                      linear_protocol="paper", linear_epochs=100)
    assert cfg["method"] == {"name": "byol", **PAPER_METHODS["byol"]} and cfg["backbone"]["stem"] == "small"
    assert (cfg["dataset"]["mean"], cfg["dataset"]["std"]) == PAPER_NORMALIZE["stl10"]
    assert {k: cfg["train"][k] for k in PAPER_TRAIN} == PAPER_TRAIN
    assert method_section("simsiam", "paper") == {"name": "simsiam", "fix_pred_lr": True}   # its backbone entry aside
    assert make_config(recipe="paper", method="simsiam")["backbone"]["zero_init_residual"] is True
    assert "zero_init_residual" not in make_config(recipe="paper", method="simclr")["backbone"]
    from attnssl.experiments import method_backbone, override
    base = make_config(recipe="cpu")
    assert method_backbone("simsiam", "cpu") == {} and override(base, {"backbone": {}}) == base   # cpu arms keep their keys
    assert views_section("contrastive_crop", "paper", warmup_epochs=100)["alpha"] == 0.1
    assert views_section("contrastive_crop", "cpu", warmup_epochs=2) == {"name": "contrastive_crop", "warmup_epochs": 2}

def test_recipe_normalisation_replaces_the_dataset_constants(tmp_path):
    import sys; sys.path.insert(0, str(Path(__file__).parent))
    from official_formats import write_cifar10
    from attnssl.experiments import build_datasets, make_config
    write_cifar10(tmp_path, n_per_batch=2, n_test=4)
    sets = build_datasets(make_config(dataset="cifar10", image_size=32, recipe="paper", data_root=str(tmp_path)))
    assert sets["ssl"].std == tuple(PAPER_NORMALIZE["cifar10"][1]) and sets["test"].mean == tuple(PAPER_NORMALIZE["cifar10"][0])
    plain = build_datasets(make_config(dataset="cifar10", image_size=32, recipe="cpu", data_root=str(tmp_path)))
    assert plain["ssl"].std != sets["ssl"].std

def test_attention_vit_is_a_run_trained_once_then_loaded(tmp_path, monkeypatch):
    """The one way to a trained attention ViT: `vit_source(config)` describes the DINO run, `attention_source_of`
    trains it through the run cache once, then loads it; the source reads that run's frozen encoder."""
    from attnssl import experiments as E
    from attnssl.attention import ViTAttentionSource
    monkeypatch.setenv("ATTNSSL_RUNS", str(tmp_path))
    base = E.make_config(num_images=16, num_test_images=8, batch_size=8, knn_k=3, device="cpu")
    spec = E.vit_source(base, vit="vit_tiny", patch_size=8, epochs=1, depth=1, embed_dim=24, n_local=1,
                        dino_kw={"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8}, block=0)
    src = E.attention_source_of(spec, base, "cpu")
    assert isinstance(src, ViTAttentionSource) and src.block == 0 and not src.outside_pretraining
    folder = E.run_dir(spec["pretrain"])
    assert folder.parent == tmp_path.resolve() and E.load_result(folder)["config"]["method"]["name"] == "dino"
    x = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(E, "pretrain", lambda *a: pytest.fail("the cached ViT run was trained again"))
    again = E.attention_source_of(spec, base, "cpu")
    assert torch.allclose(again.maps(x), src.maps(x), atol=1e-6) and again.maps(x).shape == (2, 1, 4, 4)
    encoder = torch.load(folder/"encoder.pt")        # the run's exported backbone (DINO: the teacher)
    assert all(torch.equal(v, encoder[k]) for k, v in again.module.state_dict().items())

def test_tensorboard_logging_is_runtime_not_identity(tmp_path, monkeypatch):
    "`runtime.tensorboard` (or $ATTNSSL_TENSORBOARD=1, set by `attnssl reproduce --tensorboard`) logs the run; its key is unchanged."
    pytest.importorskip("tensorboard")
    from attnssl.experiments import config_key, make_config, run_pretrain
    cfg = make_config(num_images=32, num_test_images=16, width=2, epochs=1, batch_size=16, linear=False, knn_k=5, device="cpu")
    logged = {**cfg, "runtime": {**cfg["runtime"], "tensorboard": True}}
    assert config_key(logged) == config_key(cfg)
    res = run_pretrain(logged, root=tmp_path)
    assert any((Path(res["run_dir"])/"tensorboard").glob("events.out.tfevents.*"))
    monkeypatch.setenv("ATTNSSL_TENSORBOARD", "1")
    res = run_pretrain(make_config(num_images=32, num_test_images=16, width=2, epochs=1, batch_size=16, linear=False,
                                   knn_k=5, device="cpu", seed=1), root=tmp_path)
    assert any((Path(res["run_dir"])/"tensorboard").glob("events.out.tfevents.*"))

def test_check_config_names_the_fix_before_anything_trains(tmp_path):
    from attnssl.core import ConfigError
    from attnssl.experiments import DEFAULT_CONFIG, canonical_config, check_config, make_config, run_grid
    assert check_config(DEFAULT_CONFIG) == canonical_config(DEFAULT_CONFIG)
    base = make_config(num_images=32, num_test_images=16, width=2, epochs=1, batch_size=16, linear=False, knn_k=5, device="cpu")
    check_config(base)
    for upd, match in [({"method.temprature": 0.2}, "temprature"), ({"train.epoch": 2}, "epoch"), ({"backbone.widht": 4}, "widht"),
                       ({"method.name": "simclr2"}, "unknown method"), ({"views.name": "two_crops"}, "view generator"),
                       ({"dataset.name": "cifar-11"}, "unknown dataset"), ({"eval.knn_kk": 3}, "knn_kk"),
                       ({"align": {"lam": 1.0, "target": "teacher"}}, "align.target")]:
        from attnssl.experiments import override
        with pytest.raises(ConfigError, match=match): check_config(override(base, upd))
    calls = []
    with pytest.raises(ConfigError, match="temprature"):   # the bad arm is last: nothing trains
        run_grid(base, {"ok": {}, "typo": {"method.temprature": 0.2}}, root=tmp_path, log=calls.append)
    assert calls == [] and not any(tmp_path.iterdir())

def test_projection_probe_on_z_no_head_equals_h_and_is_cached(tmp_path):
    "S2's probe on z: with no head (proj_layers=0) z is h, so both probes agree; the probe is cached, the run untouched."
    from attnssl.experiments import load_method, make_config, override, projection_probe_run, run_pretrain
    tiny = make_config(num_images=32, num_test_images=16, width=2, epochs=1, batch_size=16, linear_epochs=1, num_val_images=8)
    res = run_pretrain(override(tiny, {"method.proj_layers": 0}), root=tmp_path)
    z = projection_probe_run(res, root=tmp_path)
    assert not z["cached"] and z["dim"] == 8 * 2    # ResNet-18 width 2: h has 16 dimensions
    assert (z["knn_top1"], z["linear_top1"], z["val_knn_top1"]) == (res["knn_top1"], res["linear_top1"], res["val_knn_top1"])
    assert projection_probe_run(res, root=tmp_path)["cached"]
    lin = run_pretrain(override(tiny, {"method.proj_layers": 1, "method.proj_dim": 24}), root=tmp_path)
    assert projection_probe_run(lin, root=tmp_path)["dim"] == 24
    m = load_method(lin)
    assert not m.training and isinstance(m.projector[0], torch.nn.Linear) and len(m.projector) == 1

def test_simclr_studies_keep_existing_cache_keys():
    "The head study (proj_layers=0), composition views and the z probe add values, not sections: old keys hold."
    from attnssl.experiments import DEFAULT_CONFIG, config_key, make_config
    assert config_key(DEFAULT_CONFIG) == "4fc13f59f0f801ac" and config_key(make_config(recipe="cpu")) == "34acde05b004814a"
