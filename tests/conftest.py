"""Offline, deterministic test set-up: no hub, caches in a temporary folder unless the Makefile set one."""
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("REGCLS_PROFILE", "smoke")
_tmp = tempfile.mkdtemp(prefix="regcls-test-")
os.environ.setdefault("REGCLS_CACHE", os.path.join(_tmp, "cache"))
os.environ.setdefault("REGCLS_DATA", os.path.join(_tmp, "data"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smoke():
    from regcls.profiles import PROFILES
    return PROFILES["smoke"]
