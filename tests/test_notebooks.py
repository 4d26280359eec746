"""Every library notebook runs top to bottom (cells flagged `#| slow` skipped): one test per notebook."""
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT/"nbs").glob("*.ipynb"))

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb):
    skip = get_config(ROOT).tst_flags.split()
    ok, seconds = run_notebook(nb, skip_flags=skip, showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above); run it in Jupyter to debug"
