"""Random-access sources of training images: a file index, decoded lazily (in the grain workers).

Each source element is a small record (file paths, or a tfds index); `load(record)` turns it into
float32 HxWx3 arrays in [0,1], or None for an unreadable / too small image (warned once per file,
counted every time). Grey images are replicated to 3 channels, as the official loaders do.
"""

from __future__ import annotations

import collections
import glob
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data set that cannot be used as configured; the message says how to fix it."""


class SkipCounter:
    """Thread-safe tally of skipped files (warned once each)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()

    def skip(self, name: str, why: str) -> None:
        with self._lock:
            first = name not in self.counts
            self.counts[name] += 1
        if first:
            logging.warning("skipping image %s: %s", name, why)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


SKIPPED = SkipCounter()


def to_rgb_float(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        a = a / max(float(a.max()), 1.0) if img.mode != "F" else np.clip(a, 0, 1)
        return np.repeat(a[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: str | os.PathLike, min_size: int) -> np.ndarray | None:
    """float32 HxWx3 in [0,1], or None (with a warning naming the file) if it cannot be used."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = to_rgb_float(img)
    except Exception as e:  # truncated, not an image, decompression bomb, permission...
        SKIPPED.skip(str(path), f"unreadable ({type(e).__name__}: {e})")
        return None
    if min(arr.shape[:2]) < min_size:
        SKIPPED.skip(str(path), f"too small ({arr.shape[1]}x{arr.shape[0]} < {min_size} px)")
        return None
    return arr


def list_images(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    files = [p for p in glob.glob(str(root / "**" / "*"), recursive=True)
             if os.path.splitext(p)[1].lower() in IMAGE_EXTS and os.path.isfile(p)]
    return sorted(files)


class ImageFolderSource:
    """Every image file under one or more folders (recursive, sorted for a stable order)."""

    def __init__(self, roots: str | Sequence[str], min_size: int = 32):
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        missing = [str(r) for r in roots if not Path(r).is_dir()]
        if missing:
            raise DataError(f"image folder not found: {', '.join(missing)}")
        self.files = [f for r in roots for f in list_images(r)]
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) under {', '.join(map(str, roots))}")
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        return self.files[i]

    def load(self, record: str) -> dict | None:
        img = read_image(record, self.min_size)
        return None if img is None else {"image": img}


class PairedFolderSource:
    """Registered pairs in the MSRS layout: `<root>/ir/NAME` with `<root>/vi/NAME` (same file name).

    Files present on one side only are left out with a warning.
    """

    def __init__(self, roots: str | Sequence[str], a: str = "ir", b: str = "vi", min_size: int = 32):
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        self.pairs: list[tuple[str, str]] = []
        for root in roots:
            da, db = Path(root) / a, Path(root) / b
            if not (da.is_dir() and db.is_dir()):
                raise DataError(f"{root}: expected paired folders {a}/ and {b}/ (MSRS layout)")
            fa = {os.path.relpath(p, da): p for p in list_images(da)}
            fb = {os.path.relpath(p, db): p for p in list_images(db)}
            for name in sorted(set(fa) ^ set(fb)):
                logging.warning("%s: %s has no partner in %s/ and %s/; left out", root, name, a, b)
            self.pairs += [(fa[n], fb[n]) for n in sorted(set(fa) & set(fb))]
        if not self.pairs:
            raise DataError(f"no {a}/{b} image pairs under {', '.join(map(str, roots))}")
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.pairs[i]

    def load(self, record: tuple[str, str]) -> dict | None:
        a = read_image(record[0], self.min_size)
        b = read_image(record[1], self.min_size) if a is not None else None
        if a is None or b is None:
            return None
        if a.shape != b.shape:
            SKIPPED.skip(f"{record[0]} + {record[1]}", f"pair sizes differ ({a.shape[:2]} vs {b.shape[:2]})")
            return None
        return {"ir": a, "vi": b}


def coco_missing_message(data_dir: str, name: str) -> str:
    return (f"COCO ({name!r} for tensorflow-datasets) is not prepared under {data_dir!r}. Prepare it once "
            f"(~19 GB download, needs `pip install tensorflow`): `tfds build {name} --data_dir={data_dir} "
            "--file_format=array_record`; or download train2017.zip from https://cocodataset.org/#download, "
            "unzip it and train on the folder instead: --config.data.single.kind=folder "
            "--config.data.single.path=/path/to/train2017")


class TfdsImageSource:
    """Images of a prepared tensorflow-datasets build (array_record), e.g. `coco/2017` train.

    Records are indices into `tfds.builder_from_directory(...).as_data_source(split)`, which needs no
    TensorFlow at training time.
    """

    def __init__(self, name: str = "coco/2017", split: str = "train", data_dir: str | None = None,
                 min_size: int = 32):
        data_dir = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
        infos = sorted(glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json")))
        if not infos:
            raise DataError(coco_missing_message(data_dir, name))
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder_from_directory(os.path.dirname(infos[-1]))
            self.ds = builder.as_data_source(split=split)
        except Exception as e:
            raise DataError(f"{os.path.dirname(infos[-1])}: cannot read split {split!r} as a random-access "
                            f"source ({type(e).__name__}: {e}); it must be built with "
                            "--file_format=array_record. " + coco_missing_message(data_dir, name)) from None
        self.name, self.min_size = name, min_size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def load(self, record: int) -> dict | None:
        label = f"{self.name}[{record}]"
        try:
            ex = self.ds[record]
            img = np.asarray(ex["image"])
            label = f"{self.name}[{record}] {ex.get('image/filename', b'')!r}"
        except Exception as e:
            SKIPPED.skip(label, f"unreadable ({type(e).__name__}: {e})")
            return None
        if img.ndim == 2 or img.shape[-1] == 1:
            img = np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=-1)
        if min(img.shape[:2]) < self.min_size:
            SKIPPED.skip(label, f"too small ({img.shape[1]}x{img.shape[0]})")
            return None
        return {"image": img[..., :3].astype(np.float32) / 255.0}


def build_source(cfg: Mapping[str, Any]):
    """Source from a config block: kind 'folder' | 'paired' | 'tfds' (+ path(s), name, split, ...)."""
    kind = cfg.get("kind")
    min_size = int(cfg.get("min_size", 32))
    if kind == "folder":
        return ImageFolderSource(cfg["path"], min_size=min_size)
    if kind == "paired":
        return PairedFolderSource(cfg["path"], cfg.get("a", "ir"), cfg.get("b", "vi"), min_size=min_size)
    if kind == "tfds":
        return TfdsImageSource(cfg.get("name", "coco/2017"), cfg.get("split", "train"), cfg.get("data_dir"),
                               min_size=min_size)
    raise DataError(f"unknown data kind {kind!r} (expected 'folder', 'paired' or 'tfds')")
