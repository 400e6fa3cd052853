"""`folder`: a folder of images (JPEG, PNG, WebP; any size and mode) as a prepared tfds dataset.

`Folder(folder=PATH, image_size=S, channels=C)` scans PATH (recursively; names starting with '.' are
skipped) and prepares, once, one 'train' split of S x S x C uint8 images: each file is decoded with
Pillow, turned upright by its EXIF orientation, composited onto white if it has transparency,
converted to RGB or greyscale (16-bit greyscale scaled to 8 bits), centre-cropped to a square and
resized to S with the input pipeline's `to_square`, and stored as PNG. When every image lies in a
sub-folder, the sorted sub-folder names are the class labels 0..K-1.

With `captions=True` (the input pipeline's choice for model.text_encoder='trained', and for
data.embed_captions) each image NAME.png
needs NAME.txt beside it, its caption (UTF-8, surrounding whitespace dropped), stored as the Text
feature 'caption'. With `embedding_shape=(L, D)` ('precomputed') it needs NAME.npz holding 'text_emb'
float [l, D] with l <= L and optionally 'text_mask' bool [l] (default all True), stored as 'text_emb'
float32 [l, D] and 'text_mask' bool [l], as long as each caption (the input pipeline pads them to L:
a T5-XXL caption of 20 tokens takes 320 KB, not the 2 MB of 128 padded ones). A missing or malformed file is a
UserError naming it, from `check_images`, before anything is prepared.

The prepared copy goes to `CACHE_ROOT/<S>px_<C>ch[_captions|_emb<L>x<D>]_<fingerprint>/folder/<version>/`,
where CACHE_ROOT is `cache_dir` or `PATH/.ddpm_jax_cache` and the fingerprint hashes every image's path,
size and mtime (and those of the captions or embeddings read): adding, removing or touching a file
prepares a new copy, and an unchanged folder is never decoded again. Files that cannot be decoded are
skipped and named in the log and in the copy's metadata.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import zipfile

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image, ImageOps

from ddpm_jax.files import load_npz
from ddpm_jax.validation import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSION, EMBEDDING_EXTENSION = ".txt", ".npz"  # NAME.txt / NAME.npz beside NAME.png
CACHE_DIRNAME = ".ddpm_jax_cache"  # starts with '.', so the scan never reads the cache as images
EMBED_HINT = " (python -m ddpm_jax.embed writes them from captions NAME.txt with a frozen T5)"
_CHUNK = 256  # files decoded concurrently; bounds the decoded images held in memory


@dataclasses.dataclass(frozen=True)
class Listing:
    """The images under `root`: relative paths (sorted), their labels, and a fingerprint of them all."""

    root: str
    files: tuple[str, ...]
    class_names: tuple[str, ...] | None  # sorted sub-folder names when every image is in one
    labels: tuple[int, ...] | None
    fingerprint: str
    num_ignored: int  # files that are not images by their extension, nor a sidecar read
    sidecar: str  # the extension of the file read beside each image ('' for none)
    missing: tuple[str, ...]  # the images without that file

    @property
    def root_images(self) -> list[str]:
        return [f for f in self.files if "/" not in f]


def sidecar_path(relpath: str, extension: str) -> str:
    """The file beside the image `relpath` with the same name and `extension` (a.png -> a.txt)."""
    return os.path.splitext(relpath)[0] + extension


def scan(root: str, sidecar: str = "") -> Listing:
    """Lists the images under `root` and, when `sidecar` is an extension, the file of that extension
    beside each; a UserError naming data.data_dir if there are no images."""
    if not os.path.isdir(root):
        raise UserError(f"data.data_dir={root!r}: no such folder (data.dataset='folder' reads the images in it).")
    files, stats, ignored, seen = [], [], 0, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: followed folders are read once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        for name in filenames:
            if name.startswith("."):  # .DS_Store, macOS '._x.jpg' resource forks, ...
                continue
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                ignored += 1
                continue
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            files.append(os.path.relpath(path, root).replace(os.sep, "/"))
            stats.append((st.st_size, st.st_mtime_ns))
    if not files:
        others = f" ({ignored} other files are not {'/'.join(IMAGE_EXTENSIONS)})" if ignored else ""
        raise UserError(f"data.data_dir={root!r} has no images{others}: data.dataset='folder' reads "
                        f"{', '.join(IMAGE_EXTENSIONS)} files in it and its sub-folders.")
    order = sorted(range(len(files)), key=files.__getitem__)
    files, stats = [files[i] for i in order], [stats[i] for i in order]
    class_names = labels = None
    if all("/" in f for f in files):
        tops = [f.split("/", 1)[0] for f in files]
        class_names = tuple(sorted(set(tops)))
        index = {name: i for i, name in enumerate(class_names)}
        labels = tuple(index[t] for t in tops)
    key = [files, stats]
    missing, found = [], set()
    if sidecar:
        sidecar_stats = []
        for f in files:
            side = sidecar_path(f, sidecar)
            try:
                st = os.stat(os.path.join(root, side))
            except OSError:
                missing.append(f)
                sidecar_stats.append(None)
                continue
            found.add(side)
            sidecar_stats.append((st.st_size, st.st_mtime_ns))
        key += [sidecar, sidecar_stats]  # only then: image-only copies keep their fingerprint
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return Listing(root, tuple(files), class_names, labels, digest, ignored - len(found), sidecar, tuple(missing))


def check_classes(listing: Listing, num_classes: int) -> None:
    """UserError unless the sub-folders give `num_classes` classes (nothing to check when it is 0)."""
    if not num_classes:
        return
    root = listing.root
    if listing.class_names is None:
        loose = listing.root_images
        if len(loose) < len(listing.files):
            raise UserError(f"model.num_classes={num_classes}: {len(loose)} images lie directly in data.data_dir="
                            f"{root!r} (e.g. {loose[0]!r}), outside the class sub-folders; move them into one, "
                            f"or use model.num_classes=0.")
        raise UserError(f"model.num_classes={num_classes}: data.data_dir={root!r} has no class sub-folders; put "
                        f"each class's images in a sub-folder named after it (sorted names are labels 0.."
                        f"{num_classes - 1}), or use model.num_classes=0.")
    names = listing.class_names
    if len(names) != num_classes:
        shown = ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")
        raise UserError(f"model.num_classes={num_classes}: data.data_dir={root!r} has {len(names)} class "
                        f"sub-folders with images ({shown}).")


def load_image(path: str, channels: int) -> np.ndarray:
    """The image file at `path` as uint8 `[H, W, channels]`, upright, transparency on white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # phone photos are often stored sideways with an EXIF tag
        im.load()
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: Pillow's convert would clip at 255
        im = Image.fromarray(np.round(np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # The colour under transparent pixels is arbitrary (often black); white is what a viewer shows.
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    return array.reshape(array.shape[:2] + (channels,))


def read_caption(root: str, relpath: str) -> str:
    """The caption in the text file `relpath` under `root`, surrounding whitespace dropped."""
    try:
        # utf-8-sig: also drops the byte-order mark some Windows editors write first.
        with open(os.path.join(root, relpath), encoding="utf-8-sig") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data.data_dir={root!r}: {relpath} cannot be read as UTF-8 text "
                        f"({type(e).__name__}).") from None


def read_embedding(root: str, relpath: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(text_emb float32 [l, D], text_mask bool [l]) from the .npz `relpath` under `root`, of its own
    length l <= L = shape[0]; a UserError naming the file if it is not such an .npz."""
    length, dim = shape
    where = f"data.data_dir={root!r}: {relpath}"
    arrays = load_npz(os.path.join(root, relpath), "data.data_dir", ("text_emb",), where=where)
    emb = arrays["text_emb"]
    if emb.ndim != 2 or emb.shape[1] != dim or not len(emb) or not np.issubdtype(emb.dtype, np.floating):
        raise UserError(f"{where}: 'text_emb' must be float [L, {dim}] (model.text_emb_dim={dim}), got "
                        f"{emb.dtype} {emb.shape}.")
    if len(emb) > length:
        raise UserError(f"{where}: 'text_emb' has {len(emb)} tokens, more than data.max_text_len={length}; "
                        f"raise data.max_text_len.")
    if not np.isfinite(emb).all():
        raise UserError(f"{where}: 'text_emb' has NaN or infinite values.")
    mask = arrays.get("text_mask", np.ones(len(emb), bool))
    if mask.shape != emb.shape[:1] or not mask.any():
        raise UserError(f"{where}: 'text_mask' must be bool [{len(emb)}] (one per token of 'text_emb') with at "
                        f"least one True, got {mask.dtype} {mask.shape} with {int(np.count_nonzero(mask))} True.")
    return emb.astype(np.float32), mask.astype(bool)


def write_embeddings(root: str, embed, encoder: str, batch_size: int = 64) -> tuple[int, int, int]:
    """Writes NAME.npz beside every image's caption NAME.txt under `root`: 'text_emb' float32 [l, D],
    the caption's l tokens as `embed(captions) -> (text_emb [B, L, D], mask [B, L])` gives them, and
    'encoder', the string `encoder` naming the encoder. A file that already holds this `encoder` and is
    newer than its caption is kept, so a stopped run resumes; each file appears whole (written under
    a hidden name, then renamed). With several processes each writes every n-th file from its index
    first, then, after all have, the files it still lacks (hosts that do not share the folder).
    Returns (files this process wrote, files that were out of date, captions)."""
    listing = scan(root, CAPTION_EXTENSION)
    if listing.missing:
        first = listing.missing[0]
        raise UserError(f"data.data_dir={root!r}: {len(listing.missing)} of its {len(listing.files)} images have no "
                        f"caption beside them, the first {sidecar_path(first, CAPTION_EXTENSION)!r}.")
    captions = [sidecar_path(f, CAPTION_EXTENSION) for f in listing.files]
    stale = [c for c in captions if not _embedded(root, c, encoder)]

    def write(todo):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            emb, mask = embed([read_caption(root, c) for c in chunk])
            for caption, e, m in zip(chunk, emb, mask):
                path = os.path.join(root, sidecar_path(caption, EMBEDDING_EXTENSION))
                partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
                with open(partial, "wb") as f:
                    np.savez(f, text_emb=e[m], encoder=np.array(encoder))
                os.replace(partial, path)
            logging.info("data.data_dir=%s: embedded %d of %d captions", root, start + len(chunk), len(todo))
        return len(todo)

    written = write(stale[jax.process_index()::jax.process_count()])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ddpm_jax: embed shares written")
        written += write([c for c in stale if not _embedded(root, c, encoder)])
    return written, len(stale), len(captions)


def _embedded(root: str, caption: str, encoder: str) -> bool:
    """Whether the .npz beside `caption` holds `encoder`'s embedding of it (and is newer than it)."""
    path = os.path.join(root, sidecar_path(caption, EMBEDDING_EXTENSION))
    try:
        # <=: file times tick coarsely (~4 ms), so a caption edited in the same tick is not missed
        if os.stat(path).st_mtime_ns <= os.stat(os.path.join(root, caption)).st_mtime_ns:
            return False
        with np.load(path, allow_pickle=False) as f:
            return "encoder" in f.files and str(f["encoder"]) == encoder
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def _header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, None if unreadable (then skipped when decoding)."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001  (any failure to read is reported by `_generate_examples`)
        return None


class Folder(tfds.core.GeneratorBasedBuilder):
    """The images of one folder, prepared at one size and channel count (see the module doc)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "Text embeddings stored as long as each caption."}

    def __init__(self, *, folder: str, image_size: int, channels: int, cache_dir: str | None = None,
                 captions: bool = False, embedding_shape: tuple[int, int] | None = None,
                 size_field: str = "data.image_size", **kwargs):
        if captions and embedding_shape:
            raise ValueError("Folder reads captions or embeddings, not both.")
        self.captions, self.embedding_shape = captions, embedding_shape
        self.listing = scan(folder, CAPTION_EXTENSION if captions else EMBEDDING_EXTENSION if embedding_shape else "")
        self.image_size, self.channels, self.size_field = image_size, channels, size_field  # field: for errors
        cache_root = cache_dir or os.path.join(folder, CACHE_DIRNAME)
        text = "_captions" if captions else f"_emb{embedding_shape[0]}x{embedding_shape[1]}" if embedding_shape else ""
        self.variant = f"{image_size}px_{channels}ch{text}"
        self._images_checked = False
        data_dir = os.path.join(cache_root, f"{self.variant}_{self.listing.fingerprint[:16]}")
        super().__init__(data_dir=data_dir, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s, c = self.image_size, self.channels
        features = {"image": tfds.features.Image(shape=(s, s, c))}
        if self.listing.class_names:
            features["label"] = tfds.features.ClassLabel(names=list(self.listing.class_names))
        if self.captions:
            features["caption"] = tfds.features.Text()
        if self.embedding_shape:
            features["text_emb"] = tfds.features.Tensor(shape=(None, self.embedding_shape[1]), dtype=np.float32)
            features["text_mask"] = tfds.features.Tensor(shape=(None,), dtype=np.bool_)
        return self.dataset_info_from_configs(
            description=f"The images in {self.listing.root}, centre-cropped and resized to {s}x{s}x{c}.",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
        )

    def check_images(self) -> None:
        """UserError if an image lacks its caption or embedding file, no image header can be read, an
        image is smaller than `image_size`, or a caption or embedding file is malformed."""
        s, listing = self.image_size, self.listing
        if listing.missing:
            first = listing.missing[0]
            kind, reader = (("caption", "model.text_encoder='trained' (or data.embed_captions=True)") if self.captions
                            else ("embedding", "model.text_encoder='precomputed'"))
            raise UserError(f"data.data_dir={listing.root!r}: {len(listing.missing)} of its {len(listing.files)} "
                            f"images have no {kind} file beside them, the first "
                            f"{sidecar_path(first, listing.sidecar)!r} (for {first!r}); {reader} reads "
                            f"NAME{listing.sidecar} beside each image NAME.png"
                            f"{EMBED_HINT if self.embedding_shape else ''}.")
        paths = [os.path.join(listing.root, f) for f in listing.files]
        with concurrent.futures.ThreadPoolExecutor() as pool:
            sizes = list(pool.map(_header_size, paths))
        if all(size is None for size in sizes):
            raise UserError(f"data.data_dir={listing.root!r}: none of its {len(paths)} image files can be read.")
        small = [(f, size) for f, size in zip(listing.files, sizes) if size and min(size) < s]
        if small:
            shown = ", ".join(f"{f} ({w}x{h})" for f, (w, h) in small[:5]) + (", ..." if len(small) > 5 else "")
            raise UserError(f"{self.size_field}={s}: {len(small)} of the {len(paths)} images in data.data_dir="
                            f"{listing.root!r} are smaller than {s}x{s}: {shown}. Remove them or lower "
                            f"{self.size_field}.")
        if listing.sidecar:
            with concurrent.futures.ThreadPoolExecutor() as pool:
                for _ in pool.map(self._text_features, listing.files):  # raises the first bad file's error
                    pass
        self._images_checked = True

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        if not self._images_checked:
            self.check_images()
        return {"train": self._generate_examples()}

    def _text_features(self, relpath: str) -> dict:
        """The features read beside the image `relpath`: {'caption'}, {'text_emb', 'text_mask'} or {}."""
        side = sidecar_path(relpath, self.listing.sidecar)
        if self.captions:
            return {"caption": read_caption(self.listing.root, side)}
        if self.embedding_shape:
            emb, mask = read_embedding(self.listing.root, side, self.embedding_shape)
            return {"text_emb": emb, "text_mask": mask}
        return {}

    def _encode(self, relpath: str) -> bytes | str:
        """The PNG of one prepared image, or why the file could not be read."""
        from ddpm_jax.input_pipeline import to_square  # imported here: input_pipeline imports this package

        try:
            image = load_image(os.path.join(self.listing.root, relpath), self.channels)
        except Exception as e:  # noqa: BLE001  (truncated, corrupt, not really an image: skip, name it)
            return f"{type(e).__name__}: {e}"
        s = self.image_size
        if image.shape[:2] != (s, s):
            image = np.round(to_square(image.astype(np.float32), s).numpy()).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if self.channels == 1 else image).save(buffer, format="PNG")
        return buffer.getvalue()

    def _generate_examples(self):
        listing = self.listing
        skipped, kept = {}, 0
        with concurrent.futures.ThreadPoolExecutor() as pool:
            for start in range(0, len(listing.files), _CHUNK):
                chunk = listing.files[start:start + _CHUNK]
                texts = pool.map(self._text_features, chunk)
                for i, (result, text) in enumerate(zip(pool.map(self._encode, chunk), texts), start):
                    relpath = listing.files[i]
                    if isinstance(result, str):
                        logging.warning("data.data_dir=%s: skipping %s (%s)", listing.root, relpath, result)
                        skipped[relpath] = result
                        continue
                    kept += 1
                    example = {"image": result, **text}
                    if listing.labels is not None:
                        example["label"] = listing.labels[i]
                    yield relpath, example
        if not kept:
            raise UserError(f"data.data_dir={listing.root!r}: none of its {len(listing.files)} image files "
                            f"can be decoded.")
        self.info.metadata["skipped"] = skipped
        if skipped:
            logging.warning("data.data_dir=%s: skipped %d of %d files that could not be read: %s", listing.root,
                            len(skipped), len(listing.files), ", ".join(skipped))
        logging.info("data.data_dir=%s: prepared %d images", listing.root, kept)
        if listing.num_ignored:
            logging.warning("data.data_dir=%s: ignored %d files that are not %s", listing.root, listing.num_ignored,
                            "/".join(IMAGE_EXTENSIONS))
