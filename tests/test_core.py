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
