"""Tables (mean ± std over seeds), CSV, pivot, figures and the report index."""
import csv, io, json, math
from pathlib import Path
import pytest
from attnssl.reports import (Table, build_index, fmt_mean_std, mean_std, pivot, save_figure, summarize, write_index,
                             write_meta, write_table)

def test_mean_std_format():
    assert fmt_mean_std([80.0, 82.0, 81.0]) == "81.0 ± 1.0"
    assert fmt_mean_std([0.12345], digits=3) == "0.123"            # one seed: no ± shown
    assert fmt_mean_std([0.5, 0.6], digits=1, scale=100) == "55.0 ± 7.1"
    assert fmt_mean_std([]) == "–" and fmt_mean_std([float("nan"), None]) == "–"
    m, s, n = mean_std([1, 2, 3, float("nan")])
    assert (m, n) == (2.0, 3) and math.isclose(s, 1.0)

def rows():
    cost = lambda w: {"wall_s": w, "peak_cpu_mb": 500.0, "peak_gpu_mb": None, "device": "CPU (2 cores)"}
    return ([{"arm": "crop", "seed": s, "linear_top1": 40.0 + 2 * s, "cost": cost(10 + s)} for s in range(3)]
            + [{"arm": "attention", "seed": 0, "linear_top1": 45.0, "cost": cost(20)}])

def test_summarize_rows_and_cost():
    t = summarize(rows(), metrics=["linear_top1"])
    assert [r["arm"] for r in t.rows] == ["crop", "attention"]
    assert t.rows[0]["linear_top1"] == "42.0 ± 2.0" and t.rows[1]["linear_top1"] == "45.0"
    assert t.rows[0]["seeds"] == 3 and t.rows[0]["time / run"] == "11 s" and t.rows[0]["device"] == "CPU (2 cores)"
    assert t.rows[0]["peak mem (CPU)"] == "500 MB"
    md = t.to_markdown()
    assert md.splitlines()[0].startswith("| arm | linear_top1 |") and "42.0 ± 2.0" in md
    raw = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert float(raw[0]["linear_top1_mean"]) == 42.0 and float(raw[0]["linear_top1_std"]) == 2.0 and raw[1]["linear_top1_std"] == ""

def test_summarize_gpu_memory_and_labels():
    r = [{"arm": "a", "x": 1.0, "cost": {"wall_s": 1, "peak_cpu_mb": 900, "peak_gpu_mb": 300, "device": "H100"}}]
    t = summarize(r, metrics=["x"], labels={"x": "metric x"})
    assert t.rows[0]["peak mem (GPU)"] == "300 MB" and "metric x" in t.columns

def test_pivot():
    g = [{"m": m, "v": v, "acc": a} for m, v, a in [("simclr", "R", 1), ("simclr", "R", 3), ("simclr", "A", 5), ("byol", "A", 7)]]
    t = pivot(g, "m", "v", "acc")
    assert t.columns == ["m", "R", "A"] and t.rows[0] == {"m": "simclr", "R": "2.0 ± 1.4", "A": "5.0"} and t.rows[1]["R"] == "–"

def test_markdown_escapes_pipes():
    assert "a\\|b" in Table([{"k": "a|b"}]).to_markdown()

def test_index_lists_every_table_and_figure(tmp_path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for i, title in [("E2", "Linear"), ("A1", "Crop"), ("E10", "later")]:
        d = tmp_path/i
        write_table(summarize(rows()), d, f"{i}_table"); write_table(summarize(rows()), d, f"{i}_extra")
        fig, ax = plt.subplots(); ax.plot([0, 1]); save_figure(fig, d, f"{i}_fig")
        write_meta(d, title=title, status="ok", profile="smoke", commit="abc", date="today", elapsed_s=3, dataset="clutter")
    (tmp_path/"E3").mkdir(); write_meta(tmp_path/"E3", title="broken", status="failed", error="boom")
    (tmp_path/"notes").mkdir()  # no meta.json: not an experiment
    idx = write_index(tmp_path, {"profile": "smoke", "hardware": "CPU"}).read_text()
    for i in ["E2", "A1", "E10"]:
        for name in [f"{i}_table", f"{i}_extra"]:
            assert f"### {name}" in idx and f"({i}/{name}.csv)" in idx
        assert f"![{i} {i}_fig]({i}/{i}_fig.png)" in idx
    assert idx.index("## E2") < idx.index("## E3") < idx.index("## E10") < idx.index("## A1")
    assert "**failed**: boom" in idx and "notes" not in idx and "| profile | smoke |" in idx
    assert not list(tmp_path.rglob("*.tmp"))

def test_pivot_cost_per_line():
    g = [{"m": "simclr", "v": v, "acc": 1.0, "cost": {"wall_s": w, "peak_cpu_mb": 100, "peak_gpu_mb": None, "device": "CPU"}}
         for v, w in [("R", 10), ("A", 30)]]
    t = pivot(g, "m", "v", "acc")
    assert t.columns == ["m", "R", "A", "time / run", "peak mem (CPU)", "device"] and t.rows[0]["time / run"] == "20 s"
