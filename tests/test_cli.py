"""`attnssl reproduce`: argument parsing, validation errors that list the valid choices, the papermill runner
(outputs, executed notebooks, meta, index, skip when up to date, failures), and one real smoke run."""
import json, os
from pathlib import Path
import nbformat
import pytest
from attnssl import cli
from attnssl.core import ConfigError

ROOT = Path(__file__).resolve().parents[1]

FAKE_BODY = """
from pathlib import Path
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from attnssl import reports as rp
if value < 0: raise ValueError("negative value")
out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)
rows = [{"arm": "a", "seed": s, "x": value + s} for s in range(seeds)]
rp.write_table(rp.summarize(rows, metrics=["x"], cost=False), out, "T_" + tag)
fig, ax = plt.subplots(); ax.plot([0, value]); rp.save_figure(fig, out, "F_" + tag)
"""

def fake_template(folder: Path, name: str, extra_params: str = ""):
    i = name.split("_")[0]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    p = nbformat.v4.new_code_cell(f'out_dir = "reports/{i}"\nseeds = 1\nvalue = 1.0\ntag = "{i}"\n{extra_params}')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {i} — fake experiment"), p, nbformat.v4.new_code_cell(FAKE_BODY)]
    nbformat.write(nb, folder/f"{name}.ipynb")

PROFILES = """
smoke: {description: fake, defaults: {}}
big:
  description: more
  defaults: {value: 2.0}
  E2: {seeds: 2}
bigger:
  extends: big
  defaults: {width: 3}
  A1: {value: 5.0}
"""

@pytest.fixture
def fake(tmp_path, monkeypatch):
    folder = tmp_path/"templates"; folder.mkdir()
    fake_template(folder, "E2_fake_table"); fake_template(folder, "A1_fake_ablation", "width = 1")
    (folder/"profiles.yaml").write_text(PROFILES)
    monkeypatch.setenv("ATTNSSL_TEMPLATES", str(folder))
    monkeypatch.setenv("ATTNSSL_THREADS", "1")
    monkeypatch.setattr(cli, "git_commit", lambda *a: "abc1234")
    return folder

def test_parser():
    a = cli.build_parser().parse_args(["reproduce", "--profile", "smoke", "--only", "E2", "A1", "--seeds", "3",
                                       "--data-root", "/d", "--out", "o", "--set", "epochs=2", "device=cpu"])
    assert (a.profile, a.only, a.seeds, a.data_root, a.out) == ("smoke", ["E2", "A1"], 3, "/d", "o")
    assert cli._parse_set(a.set_params) == {"epochs": 2, "device": "cpu"}
    assert cli.build_parser().parse_args(["reproduce"]).profile == "small"
    assert cli.build_parser().parse_args(["reproduce", "--tensorboard"]).tensorboard and not a.tensorboard
    with pytest.raises(SystemExit): cli.build_parser().parse_args(["reproduce", "--seeds", "two"])
    with pytest.raises(ConfigError): cli._parse_set(["epochs"])

def test_templates_and_profiles(fake):
    assert list(cli.list_templates()) == ["E2", "A1"]
    assert cli.template_parameters(fake/"A1_fake_ablation.ipynb") == {"out_dir": "reports/A1", "seeds": 1, "value": 1.0, "tag": "A1", "width": 1}
    assert cli.profile_parameters("big") == {"E2": {"value": 2.0, "seeds": 2}, "A1": {"value": 2.0}}
    assert cli.profile_parameters("bigger") == {"E2": {"value": 2.0, "seeds": 2}, "A1": {"value": 5.0, "width": 3}}

def test_errors_list_valid_choices(fake, tmp_path, capsys):
    with pytest.raises(ConfigError, match="valid profiles are: smoke, big, bigger"): cli.plan("nope")
    with pytest.raises(ConfigError, match="valid experiment ids are: A1, E2"): cli.plan("smoke", only=["E9"])
    with pytest.raises(ConfigError, match="valid parameters are"): cli.plan("smoke", set_params={"valeu": 1})
    (fake/"profiles.yaml").write_text("p: {E2: {epochs: 3}}\n")
    with pytest.raises(ConfigError, match=r"profile 'p', E2: unknown parameter 'epochs'; valid parameters are: out_dir, seeds, tag, value"):
        cli.plan("p")
    (fake/"profiles.yaml").write_text("p: {defaults: {nothing: 1}}\n")
    with pytest.raises(ConfigError, match="unknown parameter 'nothing'"): cli.plan("p")
    (fake/"profiles.yaml").write_text("p: {E7: {}}\n")
    with pytest.raises(ConfigError, match="unknown key 'E7'"): cli.plan("p")
    assert cli.main(["reproduce", "--profile", "nope", "--out", str(tmp_path/"o")]) == 2
    assert "valid profiles are" in capsys.readouterr().err

def test_two_parameter_cells_rejected(fake):
    nb = nbformat.read(fake/"E2_fake_table.ipynb", 4)
    c = nbformat.v4.new_code_cell("x = 1"); c.metadata["tags"] = ["parameters"]; nb.cells.append(c)
    nbformat.write(nb, fake/"E2_fake_table.ipynb")
    with pytest.raises(ConfigError, match="exactly one"): cli.plan("smoke")

def test_plan_passes_out_seeds_data_root(fake, tmp_path):
    p = cli.plan("big", seeds=4, data_root="data", out=tmp_path/"r", set_params={"width": 7})
    assert p["E2"] == {"value": 2.0, "seeds": 4, "out_dir": str((tmp_path/"r"/"E2").resolve())}
    assert p["A1"]["width"] == 7 and "width" not in p["E2"]

def test_reproduce_runs_indexes_and_skips(fake, tmp_path):
    out, lines = tmp_path/"reports", []
    res = cli.reproduce("big", out=out, log=lines.append)
    assert res["failed"] == [] and (out/"E2"/"T_E2.md").exists() and (out/"A1"/"F_A1.png").exists()
    assert "2.5 ± 0.7" in (out/"E2"/"T_E2.md").read_text()            # value 2.0, seeds 2
    assert (out/"E2"/"E2_fake_table.ipynb").exists()                   # the executed notebook
    meta = json.loads((out/"E2"/"meta.json").read_text())
    assert meta["status"] == "ok" and meta["profile"] == "big" and meta["commit"] == "abc1234" and meta["parameters"]["seeds"] == 2
    idx = (out/"README.md").read_text()
    for s in ["E2/T_E2.csv", "![E2 F_E2](E2/F_E2.png)", "![A1 F_A1](A1/F_A1.png)", "### T_A1", "| profile | big |"]: assert s in idx
    assert any("E2 — fake experiment: ok in" in l for l in lines)
    lines.clear(); cli.reproduce("big", out=out, log=lines.append)
    assert sum("up to date" in l for l in lines) == 2                  # same template, parameters, commit
    lines.clear(); cli.reproduce("big", only=["E2"], seeds=3, out=out, log=lines.append)
    assert not any("up to date" in l for l in lines) and "3.0 ± 1.0" in (out/"E2"/"T_E2.md").read_text()

def test_jobs_run_templates_side_by_side(fake, tmp_path):
    out = tmp_path/"reports"
    res = cli.reproduce("big", out=out, jobs=2, log=None)
    assert res["failed"] == [] and list(res["experiments"]) == ["E2", "A1"]        # study order, whatever finished first
    assert "2.5 ± 0.7" in (out/"E2"/"T_E2.md").read_text() and (out/"A1"/"F_A1.png").exists()
    meta = json.loads((out/"A1"/"meta.json").read_text())
    assert meta["jobs"] == 2 and meta["threads"] == 1 and meta["status"] == "ok"
    assert "--jobs 2" in (out/"README.md").read_text()
    with pytest.raises(ConfigError, match="jobs must be at least 1"): cli.reproduce("big", out=out, jobs=0)

def test_schedule_starts_the_vit_trainer_then_the_vit_free_templates(tmp_path):
    for name, code in [("E0_vit", "src = ex.attention_spec(base, shared)"), ("E1_a", "v = ex.vit_source(base)"),
                       ("E2_b", "src = ex.attention_spec(base, shared)"), ("S1_c", "x = 1"), ("T1_d", "y = 2")]:
        nb = nbformat.v4.new_notebook(); nb.cells = [nbformat.v4.new_code_cell(code)]
        nbformat.write(nb, tmp_path/f"{name}.ipynb")
    tpl = cli.list_templates(tmp_path)
    assert [i for i in tpl if cli.needs_vit(tpl[i])] == ["E0", "E1", "E2"]
    assert cli.schedule(list(tpl), tpl) == ["E0", "S1", "T1", "E1", "E2"]
    assert cli.schedule(["S1", "E2", "T1"], tpl) == ["E2", "S1", "T1"]   # whichever ViT template comes first trains it
    assert cli.schedule(["S1", "T1"], tpl) == ["S1", "T1"]

def test_failure_is_recorded_and_raised(fake, tmp_path, capsys):
    out = tmp_path/"reports"
    # main() returns 1 because reproduce() raises RuntimeError after writing meta and index
    assert cli.main(["reproduce", "--profile", "smoke", "--only", "E2", "--out", str(out), "--set", "value=-1"]) == 1
    assert "experiments failed: E2" in capsys.readouterr().err
    meta = json.loads((out/"E2"/"meta.json").read_text())
    assert meta["status"] == "failed" and "negative value" in meta["error"]
    assert "**failed**" in (out/"README.md").read_text()

@pytest.mark.skipif(not (ROOT/"nbs"/"experiments"/"E9_positive_similarity.ipynb").exists(), reason="no E9 template")
def test_smoke_end_to_end(tmp_path, monkeypatch):
    "The real E9 template on the smoke profile (ground-truth attention, so no ViT is trained), easier data."
    monkeypatch.delenv("ATTNSSL_TEMPLATES", raising=False)
    out = tmp_path/"reports"
    res = cli.reproduce(profile="smoke", only=["E9"], out=out, runs_root=tmp_path/"runs",
                        set_params={"attn_source": "ground_truth", "clutter": 0.5, "object_area": [0.2, 0.5]},
                        log=None, threads=1)
    assert res["failed"] == []
    assert (out/"E9"/"E9_positive_cosine.png").exists() and (out/"E9"/"E9_similarity.csv").exists()
    idx = (out/"README.md").read_text()
    assert "E9/E9_positive_cosine.png" in idx and "random crop" in idx and "attention + align" in idx
    results = [json.loads((p/"result.json").read_text()) for p in (tmp_path/"runs").iterdir() if (p/"result.json").exists()]
    assert len(results) == 3
    assert all(r["config"]["dataset"]["clutter"] == 0.5 and r["config"]["dataset"]["object_area"] == [0.2, 0.5] for r in results)

def test_attention_command_renders_a_tiny_timm_vit(tmp_path, capsys):
    "`attnssl attention` on a saved tiny random timm ViT and a folder of images: one PNG per image."
    import timm, numpy as np
    from PIL import Image
    from attnssl.attention import save_vit_checkpoint
    from attnssl.cli import main
    kw = {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 0}
    ckpt = save_vit_checkpoint(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw), tmp_path/"vit.pt",
                               model_name="vit_tiny_patch16_224", **kw)
    imgs = tmp_path/"imgs"; (imgs/"cat").mkdir(parents=True)
    for k in range(3): Image.fromarray(np.full((40, 40, 3), 60 * k, np.uint8)).save(imgs/"cat"/f"{k}.png")
    assert main(["attention", "--checkpoint", str(ckpt), "--images", str(imgs), "--out", str(tmp_path/"out"),
                 "--image-size", "32", "--limit", "2"]) == 0
    assert sorted(p.name for p in (tmp_path/"out").glob("*.png")) == ["0_attention.png", "1_attention.png"]
    assert "2 image(s)" in capsys.readouterr().out
    assert main(["attention", "--images", str(imgs), "--out", str(tmp_path/"o2")]) == 2          # no model given
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["attention", "--checkpoint", str(tmp_path/"nope.pt"), "--images", str(imgs), "--out", str(tmp_path/"o3")]) == 2

def test_progress_of_a_template_from_its_kernel(tmp_path, monkeypatch):
    "The kernel reports its grid position (experiments.report_progress); the runner reads it with the run's epochs."
    from attnssl.cli import PROGRESS_FILE, progress_line
    from attnssl.experiments import report_progress
    out, run = tmp_path/"E3", tmp_path/"runs"/"abc"; out.mkdir(); run.mkdir(parents=True)
    assert progress_line("E3", out) is None                               # before the first run
    report_progress(grid="E3", run="byol / A seed 1", done=4, total=36, run_dir=str(run), epochs=15)
    assert not (out/PROGRESS_FILE).exists()                                # no runner: nothing written
    monkeypatch.setenv("ATTNSSL_PROGRESS", str(out/PROGRESS_FILE))
    report_progress(grid="E3", run="byol / A seed 1", done=4, total=36, run_dir=str(run), epochs=15)
    (run/"metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n')
    assert progress_line("E3", out) == "  E3: E3 run 5/36 (byol / A seed 1), epoch 2/15"
    (run/"result.json").write_text("{}")
    assert progress_line("E3", out).endswith("finished")


def test_papermill_is_quiet_about_the_shared_parameters(caplog):
    "Templates take the shared parameters without declaring them: papermill's 'unknown parameter' warning is dropped, nothing else."
    import logging
    with caplog.at_level(logging.WARNING, logger="papermill"):
        logging.getLogger("papermill").warning("Passed unknown parameter: width")
        logging.getLogger("papermill").warning("Input notebook does not contain a cell with tag 'parameters'")
    assert [r.getMessage() for r in caplog.records] == ["Input notebook does not contain a cell with tag 'parameters'"]
