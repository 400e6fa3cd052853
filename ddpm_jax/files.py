"""Users' files, local or in a bucket (gs://...): `.npz` arrays, and the `.safetensors` weights of the
checkpoints users download (the frozen T5, CLIP), put into a params tree by `place_tensor`. Every
path goes through epath, so a Cloud TPU VM reads its inputs from, and writes its results to, the
bucket its runs live in (a local folder named `gs:` would go with the VM)."""
from __future__ import annotations

import functools
import json
import zipfile

import ml_dtypes
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


# safetensors' dtype names -> numpy (bfloat16 from ml_dtypes, which JAX depends on)
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _safetensors_header(path: str) -> tuple[dict, int, np.ndarray]:
    """(header, where the tensor data starts, the file's bytes: memory-mapped when local)."""
    local = "://" not in str(path)
    data = np.memmap(path, np.uint8, "r") if local else np.frombuffer(epath.Path(path).read_bytes(), np.uint8)
    try:
        size = int(data[:8].view("<u8")[0])
        header = json.loads(bytes(data[8:8 + size]))
        assert isinstance(header, dict)
    except (ValueError, IndexError, AssertionError):
        raise UserError(f"{path}: not a safetensors file.") from None
    return header, 8 + size, data


def safetensors_names(path: str) -> list[str]:
    """The tensor names in the safetensors file `path`."""
    return [name for name in _safetensors_header(path)[0] if name != "__metadata__"]


def place_tensor(params: dict, shapes: dict, keys: tuple[str, ...], value: np.ndarray) -> tuple[int, ...] | None:
    """Puts `value` at `keys` in the nested dict `params` when the params tree `shapes` (of
    `jax.eval_shape`) has its shape there; otherwise returns the shape expected."""
    expected = functools.reduce(lambda tree, k: tree[k], keys, shapes).shape
    if value.shape != expected:
        return expected
    functools.reduce(lambda tree, k: tree.setdefault(k, {}), keys[:-1], params)[keys[-1]] = value
    return None


def load_safetensors(path: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors `names` (default all) of the safetensors file `path` (an 8-byte little-endian header
    size, a JSON header of {name: {dtype, shape, data_offsets}}, then the data), as numpy arrays in
    their stored dtype; only the tensors asked for are read."""
    header, start, data = _safetensors_header(path)
    tensors = {}
    for name in names if names is not None else safetensors_names(path):
        info = header[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which is not read.")
        begin, end = info["data_offsets"]
        tensors[name] = np.array(data[start + begin:start + end].view(_SAFETENSORS_DTYPES[info["dtype"]])
                                 .reshape(info["shape"]))
    return tensors


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` as the safetensors file `path` (the layout `load_safetensors` reads; the header
    padded with spaces to 8 bytes, so the data is aligned), through a temporary file renamed when complete."""
    dtypes = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for name, value in tensors.items():
        header[name] = {"dtype": dtypes[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    target = epath.Path(path)
    temporary = target.parent / (target.name + ".tmp")
    with temporary.open("wb") as f:
        f.write(np.uint64(len(text)).astype("<u8").tobytes() + text)
        for value in tensors.values():
            f.write(np.ascontiguousarray(value).tobytes())
    temporary.replace(target)
