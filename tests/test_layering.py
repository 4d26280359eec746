"""One way in: each attnssl module imports only modules below it in `ORDER` (module-level and function-local
imports alike, absolute or relative), and the tour's module map (nbs/index.ipynb) lists the same order."""
import ast, json, os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT/"attnssl"
# Lowest first: the one definition of the layering (nbs/index.ipynb, "Module map", must list the same).
ORDER = ("core", "distributed", "datasets", "synthetic", "augment", "models", "attention", "foreground", "views", "losses",
         "methods", "pretext", "align", "pixel", "feature_aug", "evaluate", "dense", "train", "experiments", "reports", "cli")
# Not layers: the package itself (it imports `synthetic`, which registers "clutter") and nbdev's index.
NOT_LAYERS = ("__init__", "_modidx")


def imported_modules(source: str) -> list[tuple[str, int]]:
    "(attnssl module, line) for every import of one in `source`, at module level or inside a function or class."
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1: names = ["attnssl.<parent package>"]   # nothing in the package goes up: flagged
            elif node.level == 1: names = [f"attnssl.{node.module}"] if node.module else [f"attnssl.{a.name}" for a in node.names]
            elif node.module == "attnssl": names = [f"attnssl.{a.name}" for a in node.names]
            else: names = [node.module or ""]
        else: continue
        out += [(n.split(".")[1], node.lineno) for n in names if n.startswith("attnssl.")]
    return out


def layering_violations(order=ORDER) -> list[str]:
    rank = {m: i for i, m in enumerate(order)}
    bad = []
    for path in sorted(PKG.glob("*.py")):
        me = path.stem
        if me in NOT_LAYERS: continue
        for dep, line in imported_modules(path.read_text()):
            if dep != me and not rank.get(dep, len(order)) < rank.get(me, -1):
                bad.append(f"attnssl/{path.name}:{line}: {me} imports {dep}")
    return bad


def test_every_module_has_a_layer():
    modules = {p.stem for p in PKG.glob("*.py")} - set(NOT_LAYERS)
    assert modules == set(ORDER), f"not in ORDER: {sorted(modules - set(ORDER))}; in ORDER, no module: {sorted(set(ORDER) - modules)}"


def test_no_module_imports_a_higher_one():
    bad = layering_violations()
    assert not bad, "these imports reach a module at or above the importer's layer (see ORDER):\n" + "\n".join(bad)


def test_the_check_sees_every_kind_of_import():
    src = ("import torch\nfrom .core import x\nfrom . import views\nimport attnssl.train as T\nfrom attnssl import methods, cli\n"
           "def f():\n    from attnssl.experiments import run_pretrain\n    from attnssl.attention import y\n")
    assert imported_modules(src) == [("core", 2), ("views", 3), ("train", 4), ("methods", 5), ("cli", 5),
                                     ("experiments", 7), ("attention", 8)]


def _module_map() -> list[str]:
    "The module names listed, in order, under the 'Module map' heading of nbs/index.ipynb."
    nb = json.loads((ROOT/"nbs"/"index.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\s*\d+\.\s+`(?:attnssl\.)?(\w+)`", section, flags=re.M)


def test_module_map_in_the_tour_is_the_checked_order():
    assert tuple(_module_map()) == ORDER


def test_clutter_is_registered_after_importing_datasets_alone():
    code = ("import attnssl.datasets as d\n"
            "ds = d.get_dataset('clutter', 'test', num_images=4, cache=False)\n"
            "print(type(ds).__name__, len(ds), 'clutter' in d.dataset_names())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ClutterShapes", "4", "True"]
