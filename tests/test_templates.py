"""The experiment templates: one per experiment of nbs/method.ipynb, section 12 (experiments), each with exactly
one `parameters` cell, a python3 kernel, no export cells; every profile only sets parameters its templates declare."""
import json, os, re
from pathlib import Path
import pytest
from attnssl.cli import list_templates, load_profiles, parameter_cells, profile_parameters, template_parameters, template_title

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT/"nbs"/"experiments").glob("*.ipynb"))
IDS = list(list_templates(ROOT/"nbs"/"experiments"))   # discovered: a new family needs no change here

def test_every_notebook_in_the_folder_is_a_template_and_the_study_comes_first():
    assert len(IDS) == len(TEMPLATES)
    study = [f"E{i}" for i in range(10)] + [f"A{i}" for i in range(1, 7)]
    assert IDS[:len(study)] == study

def test_template_registry_is_open_to_new_families(tmp_path):
    for name in ["H2_pixel.ipynb", "A1_x.ipynb", "F1_feature.ipynb", "E10_y.ipynb", "E2_z.ipynb", "notes.ipynb", "h3_lower.ipynb"]:
        (tmp_path/name).write_text("{}")
    assert list(list_templates(tmp_path)) == ["E2", "E10", "A1", "F1", "H2"]

@pytest.mark.parametrize("nb", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_template_shape(nb):
    d = json.loads(nb.read_text())
    assert d["metadata"]["kernelspec"]["name"] == "python3"
    assert len(parameter_cells(nb)) == 1
    code = ["".join(c["source"]) for c in d["cells"] if c["cell_type"] == "code"]
    assert not any(re.search(r"^#\|\s*(export|exporti|default_exp)", src, re.M) for src in code), "templates have no export cells"
    params = template_parameters(nb)
    assert params["out_dir"] == f"reports/{nb.name.split('_')[0]}"
    assert d["cells"][0]["cell_type"] == "markdown" and template_title(nb).startswith(nb.name.split("_")[0])
    prose = "".join(d["cells"][0]["source"])
    assert "What it tests" in prose and "reconstruction" in prose.lower()
    # outputs only under out_dir: no other paths written by the body
    body = "\n".join(code[1:])
    assert "out_dir" in body and "reports/" not in body

@pytest.mark.parametrize("profile", list(load_profiles(ROOT/"nbs"/"experiments"/"profiles.yaml")))
def test_profiles_valid(profile, monkeypatch):
    monkeypatch.setenv("ATTNSSL_TEMPLATES", str(ROOT/"nbs"/"experiments"))
    per = profile_parameters(profile)
    assert set(per) == set(IDS)
    for i, params in per.items():
        assert set(params) <= set(template_parameters(list_templates()[i]))

HALVES = {"first": IDS[:len(IDS) // 2], "second": IDS[len(IDS) // 2:]}

@pytest.mark.parametrize("half", list(HALVES))
def test_smoke_profile_runs_every_template(half, tmp_path):
    "`reproduce --profile smoke` on every template (in two halves, one per test worker); a second call reuses the cache."
    from attnssl.cli import reproduce
    out, runs, ids = tmp_path/"reports", tmp_path/"runs", HALVES[half]
    res = reproduce(profile="smoke", only=ids, out=out, runs_root=runs, log=None, threads=1)
    assert not res["failed"] and list(res["experiments"]) == ids
    for i in ids:
        assert any(out.joinpath(i).glob("*.md")) or any(out.joinpath(i).glob("*.png")), f"{i} wrote no table or figure"
        assert (out/i/"meta.json").exists() and any(out.joinpath(i).glob(f"{i}_*.ipynb"))
    index = (out/"README.md").read_text()
    assert all(f"## {i}" in index for i in ids)
    if half == "second":  # every training run is cached: the second call trains nothing new
        before = sorted(p.name for p in runs.iterdir())
        again = reproduce(profile="smoke", only=ids, out=out, runs_root=runs, log=None, threads=1)
        assert not again["failed"] and sorted(p.name for p in runs.iterdir()) == before

def test_shared_parameters_are_declared_once():
    "A template's parameters cell declares only its own; the shared set (experiments.SharedParams) comes with it."
    import dataclasses
    from attnssl.experiments import SharedParams
    shared = {f.name for f in dataclasses.fields(SharedParams)}
    for nb in TEMPLATES:
        own = {l.split("=")[0].strip() for l in "".join(parameter_cells(nb)[0]["source"]).splitlines() if "=" in l and not l.startswith("#")}
        params = template_parameters(nb)
        assert shared <= set(params) and own <= set(params), nb.name
        assert all(params[k] != getattr(SharedParams(), k) for k in own & shared), f"{nb.name} repeats a shared default"
    assert template_parameters(ROOT/"nbs"/"experiments"/"E4_loss_analysis.ipynb")["epochs"] == 2   # its own smoke default wins
