import os
import pytest
import torch

# Two pytest-xdist workers share the machine's cores: one thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
# Generated datasets and caches go to a per-session folder, never the user's cache.
@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    if "ATTNSSL_CACHE" not in os.environ:
        os.environ["ATTNSSL_CACHE"] = str(tmp_path_factory.mktemp("attnssl_cache"))
    yield
