"""Test setup: 8 fake CPU devices, set before JAX starts, so data parallelism runs as on an 8-chip host.

XLA_FLAGS rather than `chex.set_n_cpu_devices`: the commands the tests start as subprocesses inherit it."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`
