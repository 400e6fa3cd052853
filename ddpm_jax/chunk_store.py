"""Finished batches of a long sampling or evaluation on disk, so that a rerun after a preemption
resumes where it stopped.

`parallel.pad_shard_unpad` maps a function over its inputs in chunks; chunk c draws its noise from
fold_in(key, c), so it is the same whenever it is computed. With a `ChunkStore` each finished chunk's
outputs are written to DIR/process_P/chunk_CCCCCC.npz (every process has every row, so each keeps
its own copy: no process reads another's files); a rerun with the same settings reads the chunks
there and computes only the rest, and its result equals an uninterrupted run's. The caller removes
the folder once its result is written (`clear`).

What the outputs depend on is the store's fingerprint: the caller's `identity` (config, checkpoint,
what is computed) and the layout (the inputs' bytes, rows per chunk, devices and processes). Files
of another fingerprint are deleted when a run starts, and so are files that cannot be read.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import zipfile

import jax
import numpy as np
from etils import epath

from ddpm_jax import files
from ddpm_jax.validation import UserError

META_FILE = "meta.json"
_CHUNK = re.compile(r"chunk_(\d{6,})\.npz(\.tmp)?")


def digest(tree) -> str:
    """sha256 of a pytree of arrays: the treedef, and each leaf's dtype, shape and bytes."""
    h = hashlib.sha256(str(jax.tree.structure(tree)).encode())
    for leaf in jax.tree.leaves(tree):
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{leaf.dtype}{leaf.shape}".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


class ChunkStore:
    """The finished chunks of one computation in `directory` (local or gs://), for `identity`: a
    JSON-able dict of everything but the inputs and the layout that the outputs depend on."""

    def __init__(self, directory: str, identity: dict):
        self.root = epath.Path(directory)
        self.dir = self.root / f"process_{jax.process_index()}"
        self.identity = identity

    def _chunk(self, c: int) -> epath.Path:
        return self.dir / f"chunk_{c:06d}.npz"

    def _files(self) -> list[epath.Path]:
        """This store's own files in its folder (nothing else there is ever touched)."""
        if not self.dir.exists():
            return []
        return [p for p in self.dir.iterdir() if p.name == META_FILE or _CHUNK.fullmatch(p.name)]

    def resume(self, inputs, chunk: int) -> list[dict]:
        """Starts a run over `inputs` (a pytree of `[N, ...]` arrays) in chunks of `chunk` rows: the
        outputs of its leading chunks already saved by every process, as `save` took them (empty
        when none, or when anything they depend on differs; such files are deleted)."""
        meta = {"identity": self.identity, "inputs": digest(inputs), "rows": len(jax.tree.leaves(inputs)[0]),
                "chunk": chunk, "devices": jax.device_count(), "processes": jax.process_count()}
        meta_path = self.dir / META_FILE
        try:
            same = json.loads(meta_path.read_text()) == json.loads(json.dumps(meta))
        except (OSError, ValueError):
            same = False
        done = []
        if same:
            while self._chunk(len(done)).exists():
                try:
                    with self._chunk(len(done)).open("rb") as f, np.load(f) as z:
                        done.append({k: z[k] for k in z.files})
                except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # cut short by the stop: computed again
                    break
        if not same:
            try:
                for p in self._files():
                    p.unlink()
                self.dir.mkdir(parents=True, exist_ok=True)
                meta_path.write_text(json.dumps(meta, indent=1))
            except OSError as e:  # before any work: a folder that cannot be written, or a file in the way
                raise UserError(f"{self.root}: cannot keep the finished batches there, for a rerun to resume from "
                                f"({type(e).__name__}: {e}); make it a writable folder.") from None
        if jax.process_count() > 1:  # every process resumes at the same chunk
            from jax.experimental import multihost_utils
            done = done[:int(multihost_utils.process_allgather(np.int32(len(done))).min())]
        return done

    def save(self, c: int, out: dict) -> None:
        """Writes chunk c's outputs ({name: numpy array}) whole or not at all: to a temporary file,
        then moved over any earlier file of that chunk."""
        tmp = self.dir / f"{self._chunk(c).name}.tmp"
        files.save_npz(tmp, **out)
        tmp.replace(self._chunk(c))

    def log_stop(self, done: int, total: int) -> None:
        """Says on stderr (process 0), when a run stops part way, what it keeps for the next: on a
        line of its own after the progress bar's."""
        if jax.process_index() == 0:
            print(f"\nStopped with {done} of {total} batches done; they are kept in {self.root}, and the same "
                  "command resumes from them.", file=sys.stderr)

    def clear(self) -> None:
        """Deletes this process's saved chunks (the result is written), and the folders when nothing
        else is in them."""
        for p in self._files():
            p.unlink()
        for d in (self.dir, self.root):
            try:
                if d.exists() and not any(d.iterdir()):
                    d.rmdir()
            except (OSError, ValueError):  # another process emptied or removed it first (ValueError: gs://)
                pass


def for_model(directory: str | None, config, params, **what) -> ChunkStore | None:
    """The store in `directory` (None: none) of a computation with `config`'s model and `params`: its
    identity is the config with every flag written in, the params' digest and `what` else the outputs
    depend on."""
    if directory is None:
        return None
    return ChunkStore(directory, {"config": config.to_json_best_effort(sort_keys=True), "params": digest(params),
                                  **what})


def clear(directory: str) -> None:
    """`ChunkStore.clear` of the store in `directory`."""
    ChunkStore(directory, {}).clear()
