"""Tables (mean ± std and 95% CI over seeds), CSV, pivot, paired verdicts, the collapse detector, figures and the
report index."""
import csv, io, json, math, statistics
from pathlib import Path
import pytest
from attnssl.reports import (Table, build_index, ci95, claim, collapse_flags, fmt_ci95, fmt_mean_std, mean_std,
                             paired_verdict, pivot, save_figure, summarize, t_quantile_975, verdict_table, write_index,
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

# --- 95% confidence intervals

def test_ci95_hand_computation():
    m, h, n = ci95([10.0, 12.0, 14.0, float("nan"), None])      # non-finite values are dropped
    assert (m, n) == (12.0, 3) and math.isclose(h, 4.303 * 2.0 / math.sqrt(3))
    m, h, n = ci95([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert math.isclose(h, 2.262 * math.sqrt(55 / 6) / math.sqrt(10))
    assert math.isnan(ci95([3.0])[1]) and ci95([3.0])[:1] + ci95([3.0])[2:] == (3.0, 1)
    assert math.isnan(ci95([])[0]) and ci95([])[2] == 0
    assert fmt_ci95([10.0, 12.0, 14.0]) == "± 5.0" and fmt_ci95([0.1, 0.12, 0.14], 1, 100) == "± 5.0" and fmt_ci95([1.0]) == "–"

def _t_cdf(t: float, df: int, steps: int = 4000) -> float:
    "Student t CDF by Simpson's rule on the density (independent of the table)."
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = t / steps
    return 0.5 + h / 3 * (f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps)))

@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 20, 30, 31, 45, 80, 200])
def test_ci95_t_quantiles_have_probability_975(df):
    q = t_quantile_975(df)
    dens = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (1 + q * q / df) ** (-(df + 1) / 2)
    # the table is rounded to 3 decimals: its probability is within density * 0.0005 of 0.975
    assert abs(_t_cdf(q, df) - 0.975) <= dens * 6e-4
    assert math.isnan(t_quantile_975(0))

def test_ci95_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 121):
        assert abs(t_quantile_975(df) - stats.t.ppf(0.975, df)) < 6e-4, df
    vals = [3.1, 2.7, 3.9, 3.3]
    m, h, n = ci95(vals)
    lo, hi = stats.t.interval(0.95, n - 1, loc=m, scale=stats.sem(vals))
    assert math.isclose(m - h, lo, abs_tol=1e-3) and math.isclose(m + h, hi, abs_tol=1e-3)

def test_ci95_t_quantiles_match_mpmath():
    mp = pytest.importorskip("mpmath")
    for df in range(1, 61):
        cdf = lambda t: 1 - mp.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2
        q = float(mp.findroot(lambda t: cdf(t) - mp.mpf("0.975"), 12.0 if df == 1 else 2.0))
        assert abs(t_quantile_975(df) - q) < 6e-4 if df <= 30 else abs(t_quantile_975(df) - q) < 1e-4, df

# --- paired verdicts

def test_verdict_supported():
    b = {s: 50.0 + s for s in range(4)}
    a = {0: 52.0, 1: 53.1, 2: 53.9, 3: 55.0}                      # differences 2.0, 2.1, 1.9, 2.0
    v = paired_verdict(a, b, margin=1.0)
    d = [2.0, 2.1, 1.9, 2.0]
    half = 3.182 * statistics.stdev(d) / math.sqrt(4)
    assert v["verdict"] == "supported" and v["n"] == 4 and v["seeds"] == [0, 1, 2, 3] and v["margin"] == 1.0
    assert math.isclose(v["mean_diff"], 2.0) and math.isclose(v["ci_low"], 2.0 - half) and math.isclose(v["ci_high"], 2.0 + half)
    assert set(v) == {"verdict", "n", "mean_diff", "ci_low", "ci_high", "margin", "seeds"}

def test_verdict_contradicted():
    b = {s: 50.0 + s for s in range(4)}
    a = {s: b[s] - 3.0 + 0.1 * (s % 2) for s in range(4)}
    assert paired_verdict(a, b, margin=1.0)["verdict"] == "contradicted"
    assert paired_verdict(b, a, margin=1.0)["verdict"] == "supported"

def test_verdict_inconclusive():
    b = {s: 50.0 for s in range(4)}
    noisy = {0: 53.0, 1: 47.0, 2: 52.0, 3: 49.0}                  # mean +0.25, wide interval around 0
    assert paired_verdict(noisy, b, margin=0.5)["verdict"] == "inconclusive"
    precise_small = {s: 50.3 + 0.01 * s for s in range(4)}          # surely positive, but inside the margin
    v = paired_verdict(precise_small, b, margin=0.5)
    assert v["ci_low"] > 0 and v["verdict"] == "inconclusive"

def test_verdict_not_tested():
    a, b = {0: 60.0, 1: 61.0}, {0: 50.0, 1: 50.5}
    assert paired_verdict(a, b, margin=0.5)["verdict"] == "not tested"               # 2 < min_seeds = 3
    assert paired_verdict(a, b, margin=0.5, min_seeds=2)["verdict"] == "supported"
    v = paired_verdict({0: 1.0}, {1: 0.0}, margin=0.0, min_seeds=1)                  # nothing shared
    assert v["verdict"] == "not tested" and v["n"] == 0 and v["seeds"] == []
    with pytest.raises(ValueError): paired_verdict(a, b, margin=-1.0)

def test_verdict_pairs_only_shared_seeds():
    a = {0: 52.0, 1: 53.0, 2: 54.0, 3: 90.0, 5: 1.0}
    b = {0: 50.0, 1: 51.0, 2: 52.1, 4: 0.0, 5: float("nan")}
    v = paired_verdict(a, b, margin=0.1)
    assert v["seeds"] == [0, 1, 2] and v["n"] == 3
    assert math.isclose(v["mean_diff"], statistics.fmean([2.0, 2.0, 1.9]))

def _arm_rows():
    base = {0: 40.0, 1: 41.0, 2: 39.5, 3: 40.5}
    rows = [{"arm": "crop", "seed": s, "linear_top1": v} for s, v in base.items()]
    rows += [{"arm": "attention", "seed": s, "linear_top1": v + 2.0 + 0.1 * s} for s, v in base.items()]
    rows += [{"arm": "attention", "seed": 9, "linear_top1": 99.0}]          # unpaired: ignored
    return rows

def test_verdict_claim_and_table():
    rows = _arm_rows()
    c = claim(rows, "attention", "crop", "linear_top1", 0.5, "attention beats crop", primary=True)
    assert c["verdict"] == "supported" and c["seeds"] == [0, 1, 2, 3] and c["claim"] == "attention beats crop"
    assert c["a"] == "attention" and c["b"] == "crop" and c["primary"] is True and math.isclose(c["mean_diff"], 2.15)
    c2 = claim(rows, "crop", "attention", "linear_top1", 0.5, "crop beats attention")
    c3 = claim(rows[:2] + rows[4:], "attention", "crop", "linear_top1", 0.5, "two seeds")
    assert c2["verdict"] == "contradicted" and c3["verdict"] == "not tested" and c3["n"] == 2
    t = verdict_table([c, c2, c3], caption="**Table.** claims")
    assert t.columns == ["claim", "A", "B", "metric", "n", "mean diff (A − B)", "95% CI", "margin δ", "verdict", "analysis"]
    assert t.rows[0]["mean diff (A − B)"] == "+2.1" or t.rows[0]["mean diff (A − B)"] == "+2.2"
    assert t.rows[0]["analysis"] == "primary" and t.rows[1]["analysis"] == "exploratory" and t.rows[0]["margin δ"] == "0.5"
    assert t.rows[0]["95% CI"].startswith("[+") and t.rows[1]["verdict"] == "contradicted"
    raw = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert list(raw[0]) == ["claim", "a", "b", "metric", "n", "mean_diff", "ci_low", "ci_high", "margin", "verdict", "analysis", "seeds"]
    assert raw[0]["seeds"] == "0 1 2 3" and raw[2]["verdict"] == "not tested" and float(raw[0]["ci_low"]) > 0.5
    assert "| supported |" in t.to_markdown()
    none = verdict_table([claim(rows, "attention", "missing", "linear_top1", 0.5, "no partner")])
    assert none.rows[0]["95% CI"] == "–" and none.rows[0]["mean diff (A − B)"] == "–" and none.rows[0]["verdict"] == "not tested"

def test_verdict_claim_rejects_duplicate_seeds():
    rows = _arm_rows() + [{"arm": "crop", "seed": 0, "linear_top1": 1.0}]
    with pytest.raises(ValueError, match="twice"): claim(rows, "attention", "crop", "linear_top1", 0.5, "x")

# --- collapse detector

def test_collapse_detector_each_flag():
    assert collapse_flags({"s_pos": 0.99, "s_neg": 0.97}) == ["s_neg→s_pos"]
    assert collapse_flags({"s_pos": 0.99, "s_neg": 0.90}) == []                       # gap 0.09: not collapsed
    assert collapse_flags({"s_pos": 0.93, "s_neg": 0.89}) == []                       # s_neg not above 0.9
    assert collapse_flags({"uniformity": -0.1}) == ["uniformity→0"]
    assert collapse_flags({"uniformity": -0.5}) == []
    assert collapse_flags({"knn_top1": 11.5}, num_classes=10) == ["kNN at chance"]    # chance 10% + 2 points
    assert collapse_flags({"knn_top1": 12.5}, num_classes=10) == []
    assert collapse_flags({"knn_top1": 2.0}) == []                                    # no class count: no verdict
    assert collapse_flags({"s_pos": 1.0, "s_neg": 1.0, "uniformity": 0.0, "knn_top1": 10.0}, 10) == [
        "s_neg→s_pos", "uniformity→0", "kNN at chance"]

def test_collapse_detector_no_flag():
    healthy = {"s_pos": 0.8, "s_neg": 0.05, "uniformity": -3.7, "knn_top1": 55.0, "p_pos": 0.4, "arm": "x"}
    assert collapse_flags(healthy, num_classes=10) == []
    assert collapse_flags({}) == [] and collapse_flags({"s_neg": 0.99}) == []         # missing keys: no flag
    assert collapse_flags({"uniformity": float("nan"), "s_pos": None, "s_neg": 0.95, "knn_top1": None}, 10) == []

def test_collapse_detector_in_summarize():
    rows = [{"arm": "ok", "seed": s, "knn_top1": 50.0 + s, "uniformity": -3.5} for s in range(3)]
    rows += [{"arm": "bad", "seed": s, "knn_top1": 10.0 + 2 * s, "uniformity": -0.01 if s else -1.0} for s in range(3)]
    t = summarize(rows, metrics=["knn_top1"], cost=False, collapse=True, num_classes=10)
    assert t.rows[0]["collapse"] == "–" and t.rows[1]["collapse"] == "uniformity→0 (2/3); kNN at chance (1/3)"
    raw = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert raw[0]["collapse"] == "" and raw[1]["collapse"] == "uniformity→0 (2/3); kNN at chance (1/3)"
    assert "collapse" not in summarize(rows, metrics=["knn_top1"], cost=False).columns

def test_summarize_ci95_columns():
    t = summarize(rows(), metrics=["linear_top1"])
    raw = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert list(raw[0])[:5] == ["arm", "linear_top1_mean", "linear_top1_std", "linear_top1_ci95", "seeds"]
    assert math.isclose(float(raw[0]["linear_top1_ci95"]), 4.303 * 2.0 / math.sqrt(3)) and raw[1]["linear_top1_ci95"] == ""
    assert t.rows[0]["linear_top1 95% CI"] == "± 5.0" and t.rows[1]["linear_top1 95% CI"] == "–"
    header = t.to_markdown().splitlines()[0]
    assert header.startswith("| arm | linear_top1 | 95% CI | seeds |")
    t2 = summarize(rows(), metrics=["linear_top1"], scale=0.5, labels={"linear_top1": "acc"})
    assert t2.rows[0]["acc 95% CI"] == "± 2.5" and math.isclose(t2.raw[0]["linear_top1_ci95"], 0.5 * 4.303 * 2.0 / math.sqrt(3))

def test_pivot_ci95_raw():
    g = [{"m": "simclr", "v": "R", "acc": a} for a in (1.0, 3.0, 5.0)] + [{"m": "simclr", "v": "A", "acc": 2.0}]
    t = pivot(g, "m", "v", "acc")
    assert math.isclose(t.raw[0]["R_ci95"], 4.303 * 2.0 / math.sqrt(3)) and t.raw[0]["A_ci95"] is None and t.raw[0]["R_n"] == 3
    assert list(csv.DictReader(io.StringIO(t.to_csv())))[0]["A_ci95"] == ""
