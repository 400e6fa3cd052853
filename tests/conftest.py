"""Test setup: 8 fake CPU devices, set before JAX starts, so data parallelism runs as on an 8-chip host.

XLA_FLAGS rather than `chex.set_n_cpu_devices`: the commands the tests start as subprocesses inherit it."""
import os
import shutil
import sys
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX's persistent compilation cache, every program kept: the suite is compile-bound and many tests
# compile the same small programs (test_distillation.py and test_checkpoints.py together: 235 s without,
# 163 s with it). One folder for the session: set here in the main process, before pytest-xdist starts
# its workers, which inherit it, as do the commands the tests start; removed when the session ends.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm_jax_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A local folder standing in for Cloud Storage: while the test runs, every gs://NAME/PATH read or
    written through epath is tmp_path/bucket/NAME/PATH (nothing else changes)."""
    from etils.epath import gpath, testing

    root = tmp_path / "bucket"
    root.mkdir()
    local = lambda p: str(root / os.fspath(p)[len("gs://"):]) if os.fspath(p).startswith("gs://") else p
    one = lambda fn, path, *a, **k: fn(local(path), *a, **k)
    two = lambda fn, src, dst, *a, **k: fn(local(src), local(dst), *a, **k)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// goes to tf.io.gfile, not the mock
    with testing.mock_epath(copy=two, exists=one, glob=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                            open=one, remove=one, rename=two, replace=two, rmtree=one, stat=one, walk=one):
        yield root


def pytest_unconfigure(config):
    if _OWN_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
