"""attnssl/ is generated from nbs/: exporting again must not change it."""
import shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _py_files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_text() for p in sorted(d.rglob("*.py")) if "__pycache__" not in p.parts}

def test_package_matches_notebooks(tmp_path):
    for item in ["pyproject.toml", "nbs", "attnssl"]:
        src = ROOT/item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path/item)
    exporter = Path(sys.executable).with_name("nbdev-export")
    subprocess.run([str(exporter)], cwd=tmp_path, check=True, capture_output=True)
    before, after = _py_files(ROOT/"attnssl"), _py_files(tmp_path/"attnssl")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"nbdev-export changes {changed}: edit nbs/, run `make export` and commit attnssl/"
