"""core: provenance of a result comes from the imported package, whatever the working directory."""
import shutil, subprocess, sys
from pathlib import Path

import pytest

import attnssl
from attnssl import core
from attnssl.core import git_commit, package_version

PKG = Path(attnssl.__file__).resolve().parent


def _head():
    "Short HEAD of the checkout holding the package, or None (installed copy, no git)."
    if shutil.which("git") is None: return None
    r = subprocess.run(["git", "-C", str(PKG), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def test_git_commit_from_another_working_directory(tmp_path, monkeypatch):
    head = _head()
    if head is None: pytest.skip("the package is not in a git checkout here")
    monkeypatch.chdir(tmp_path)                                   # a run started outside the repository
    assert git_commit().split("+")[0] == head
    out = subprocess.run([sys.executable, "-c", "from attnssl.core import git_commit; print(git_commit())"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert out.split("+")[0] == head and out != "unknown"
    assert git_commit(tmp_path).split("+")[0] == head            # a path outside any repository: the package's


def test_git_commit_without_a_checkout_is_the_installed_version(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "_package_dir", lambda: tmp_path)   # as if installed outside any checkout
    monkeypatch.chdir(tmp_path)
    assert git_commit() == package_version() and package_version().startswith("attnssl==")


def test_git_commit_is_dirty_for_code_changes_not_for_reports(tmp_path):
    "A regeneration writes reports/ while it runs: that is not a change to the code that produced the results."
    if shutil.which("git") is None: pytest.skip("no git")
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], capture_output=True, text=True, check=True)
    git("init", "-q"); git("config", "user.email", "t@t"); git("config", "user.name", "t")
    (tmp_path / "reports").mkdir(); (tmp_path / "pkg").mkdir()
    (tmp_path / "reports" / "E1.md").write_text("a\n"); (tmp_path / "pkg" / "m.py").write_text("x = 1\n")
    git("add", "."); git("commit", "-qm", "c")
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    (tmp_path / "reports" / "E1.md").write_text("b\n")
    assert git_commit(tmp_path / "pkg") == head                  # only reports/ changed, seen from a subfolder too
    (tmp_path / "pkg" / "m.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "pkg") == head + "+dirty"
