"""Every library notebook runs top to bottom (cells flagged `#| slow` skipped): one test per notebook."""
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT/"nbs").glob("*.ipynb"))

@pytest.fixture
def package_registries():
    """A notebook runs in this process and re-registers the classes it defines (`register_method` in 18_pixel,
    21_pretext): put the package's own registries back afterwards, so later tests in this worker see the package's."""
    from attnssl import datasets, methods
    saved = dict(methods.METHODS), dict(datasets._REGISTRY)
    yield
    for registry, old in zip((methods.METHODS, datasets._REGISTRY), saved):
        registry.clear(); registry.update(old)

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb, package_registries):
    skip = get_config(ROOT).tst_flags.split()
    ok, seconds = run_notebook(nb, skip_flags=skip, showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above); run it in Jupyter to debug"
