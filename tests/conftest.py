"""Test setup: 8 fake CPU devices, set before JAX starts, so data parallelism runs as on an 8-chip host.

XLA_FLAGS rather than `chex.set_n_cpu_devices`: the commands the tests start as subprocesses inherit it."""
import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
