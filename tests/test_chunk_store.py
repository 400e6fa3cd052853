"""`chunk_store`: a chunked computation stopped part way resumes from the chunks it finished, and
gives what an uninterrupted run gives."""
import os

import numpy as np
import pytest

from ddpm_jax import chunk_store, parallel
from ddpm_jax.validation import UserError


class Stop(Exception):
    """A preemption, in the middle of a run."""


def _fn(calls, stop_at=None):
    """A pmapped-like fn: rows [devices, per device] -> their squares and a chunk-dependent offset."""

    def fn(c, shard):
        if c == stop_at:
            raise Stop
        calls.append(c)
        x = shard["x"]
        return {"y": x ** 2 + 1000 * c, "z": -x}

    return fn


def _run(store, x, calls, stop_at=None, progress=None, post=None):
    return parallel.pad_shard_unpad(_fn(calls, stop_at), {"x": x}, batch_size=8, progress=progress, post=post,
                                    store=store)


def test_a_stopped_run_resumes_from_its_finished_chunks_and_equals_an_uninterrupted_one(tmp_path):
    x = np.arange(30, dtype=np.float32)  # 8 devices (tests/conftest.py): chunks of 8, the last padded
    whole = _run(None, x, [])
    store = lambda: chunk_store.ChunkStore(str(tmp_path / "partial"), {"what": "squares"})
    calls = []
    with pytest.raises(Stop):
        _run(store(), x, calls, stop_at=2)
    assert calls == [0, 1]
    assert sorted(os.listdir(tmp_path / "partial" / "process_0")) == ["chunk_000000.npz", "chunk_000001.npz",
                                                                       "meta.json"]
    calls, seen = [], []
    out = _run(store(), x, calls, progress=lambda *a, **k: seen.append((a, k)))
    assert calls == [2, 3]  # only the chunks the stopped run did not finish
    assert seen == [((16, 30), {"resumed": True}), ((24, 30), {}), ((30, 30), {})]
    for k in whole:
        np.testing.assert_array_equal(out[k], whole[k])
    (tmp_path / "partial" / "notes.txt").write_text("mine")
    chunk_store.clear(str(tmp_path / "partial"))
    assert os.listdir(tmp_path / "partial") == ["notes.txt"]  # only the store's own files go
    os.remove(tmp_path / "partial" / "notes.txt")
    chunk_store.clear(str(tmp_path / "partial"))
    assert not os.path.exists(tmp_path / "partial")


def test_other_inputs_identity_or_chunks_start_over(tmp_path):
    x = np.arange(30, dtype=np.float32)
    path = str(tmp_path / "p")
    with pytest.raises(Stop):
        _run(chunk_store.ChunkStore(path, {"what": "squares"}), x, [], stop_at=3)
    for identity, inputs in (({"what": "squares"}, x + 1), ({"what": "cubes"}, x)):
        calls = []
        out = _run(chunk_store.ChunkStore(path, identity), inputs, calls)
        assert calls == [0, 1, 2, 3]
        np.testing.assert_array_equal(out["y"], _run(None, inputs, [])["y"])
    calls = []
    parallel.pad_shard_unpad(_fn(calls), {"x": x}, batch_size=16, store=chunk_store.ChunkStore(path, {"what": "cubes"}))
    assert calls == [0, 1]  # chunks of 16 are not the saved chunks of 8


def test_a_chunk_cut_short_is_computed_again(tmp_path):
    x = np.arange(30, dtype=np.float32)
    path = str(tmp_path / "p")
    store = lambda: chunk_store.ChunkStore(path, {})
    with pytest.raises(Stop):
        _run(store(), x, [], stop_at=3)
    chunk1 = tmp_path / "p" / "process_0" / "chunk_000001.npz"
    chunk1.write_bytes(chunk1.read_bytes()[:100])
    calls = []
    out = _run(store(), x, calls)
    assert calls == [1, 2, 3]
    np.testing.assert_array_equal(out["y"], _run(None, x, [])["y"])


def test_post_runs_before_a_chunk_is_saved(tmp_path):
    """What is saved is what `post` returned (here the smaller dtype the sample command keeps)."""
    x = np.arange(30, dtype=np.float32)
    post = lambda c, out: {**out, "y": out["y"].astype(np.uint16)}
    store = lambda: chunk_store.ChunkStore(str(tmp_path / "p"), {})
    with pytest.raises(Stop):
        _run(store(), x, [], stop_at=2, post=post)
    with np.load(tmp_path / "p" / "process_0" / "chunk_000000.npz") as z:
        assert z["y"].dtype == np.uint16 and z["z"].dtype == np.float32
    out = _run(store(), x, [], post=post)
    np.testing.assert_array_equal(out["y"], (x ** 2 + 1000 * (np.arange(30) // 8)).astype(np.uint16))


def test_a_file_in_the_way_is_a_user_error_before_any_chunk(tmp_path):
    (tmp_path / "p").write_text("mine")
    calls = []
    with pytest.raises(UserError, match=f"{tmp_path / 'p'}: cannot keep the finished batches there"):
        _run(chunk_store.ChunkStore(str(tmp_path / "p"), {}), np.arange(30, dtype=np.float32), calls)
    assert calls == [] and (tmp_path / "p").read_text() == "mine"
