"""Users' `.npz` files, local or in a bucket (gs://...): every path goes through epath, so a Cloud TPU
VM reads its inputs from, and writes its results to, the bucket its runs live in (a local folder
named `gs:` would go with the VM)."""
from __future__ import annotations

import zipfile

import numpy as np
from etils import epath

from ddpm_jax.validation import UserError


def is_file(path: str | None) -> bool:
    """Whether `path` (local or gs://...) names a file; False for None, '' and folders."""
    return bool(path) and epath.Path(path).is_file()


def load_npz(path: str | None, field: str, keys: tuple[str, ...] = (),
             where: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of a user's `.npz` (no pickles), or a UserError naming `field`, the path and what is
    wrong: missing, not an .npz (random bytes, truncated, empty), pickled objects, or none of `keys`.
    `where`: how messages name the file (default `field=path`)."""
    if not is_file(path):
        raise UserError(f"{field}={path!r}: no such file.")
    where = where or f"{field}={path}"
    with epath.Path(path).open("rb") as fh:
        if not zipfile.is_zipfile(fh):
            raise UserError(f"{where}: not an .npz file (empty, truncated or another format).")
        fh.seek(0)
        try:
            with np.load(fh, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            reason = "it holds pickled objects, which are not read" if "pickle" in str(e) else f"unreadable ({e})"
            raise UserError(f"{where}: {reason}.") from None
    if keys and not set(keys) & set(arrays):
        raise UserError(f"{where}: expected arrays named {' or '.join(map(repr, keys))}, found {sorted(arrays)}.")
    return arrays


def save_npz(path, **arrays) -> None:
    """Writes `arrays` to the `.npz` file `path` exactly (np.savez would append '.npz' to a bare name),
    making its folder."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)
