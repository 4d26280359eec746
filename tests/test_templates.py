"""The experiment templates: one per item of METHODS 1.10, each with exactly one `parameters` cell, a python3
kernel, no export cells; every profile only sets parameters its templates declare."""
import json, os, re
from pathlib import Path
import pytest
from attnssl.cli import list_templates, load_profiles, parameter_cells, profile_parameters, template_parameters, template_title

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT/"nbs"/"experiments").glob("*.ipynb"))
EXPECTED = [f"E{i}" for i in range(10)] + [f"A{i}" for i in range(1, 7)]

def test_every_experiment_has_a_template():
    assert list(list_templates(ROOT/"nbs"/"experiments")) == EXPECTED

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
    assert set(per) == set(EXPECTED)
    for i, params in per.items():
        assert set(params) <= set(template_parameters(list_templates()[i]))

@pytest.mark.skipif(os.environ.get("ATTNSSL_SMOKE_ALL") != "1", reason="set ATTNSSL_SMOKE_ALL=1 to run every template (minutes)")
def test_all_templates_smoke(tmp_path):
    from attnssl.cli import reproduce
    res = reproduce(profile="smoke", out=tmp_path/"reports", runs_root=tmp_path/"runs", log=print)
    assert not res["failed"] and set(res["experiments"]) == set(EXPECTED)
