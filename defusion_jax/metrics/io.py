"""Minimal private image reader for the metrics (to be swapped for `defusion_jax.imageio` later)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _read_image(path) -> np.ndarray:
    """Read an image as stored: uint8 or uint16, HxW (grey) or HxWx3 (RGB); EXIF orientation applied.

    Alpha is dropped (fusion outputs and sources are opaque), palettes are expanded, 1-bit images
    become 0/255, 32-bit integer images are taken as 16-bit.
    """
    path = Path(path)
    try:
        im = Image.open(path)
        im.load()
    except Exception as exc:  # unreadable or unknown format
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return _normalise_array(tifffile.imread(path))
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    if mode == "F":
        return _normalise_array(np.asarray(im))
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode == "LA":
        return np.asarray(im)[..., 0]
    if mode == "RGBA":
        return np.asarray(im)[..., :3]
    if mode == "P":
        return np.asarray(im.convert("RGBA"))[..., :3] if "transparency" in im.info else np.asarray(im.convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _normalise_array(a: np.ndarray) -> np.ndarray:
    """Bring an array from tifffile / float images to the reader's uint8/uint16 HxW[x3] contract."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3:
        a = a[..., 0] if a.shape[-1] == 1 else a[..., :3]
    if a.dtype.kind == "f":
        scale = 255.0 if a.max() > 1.0 else 1.0
        return np.clip(np.round(a / scale * 255.0), 0, 255).astype(np.uint8)
    if a.dtype == np.uint8 or a.dtype == np.uint16:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    return np.clip(a, 0, 65535).astype(np.uint16)


def find_images(folder: Path, stem: str, ignore_case: bool = False) -> list[Path]:
    """All images in `folder` whose stem is `stem` (any extension, any case of it), sorted by name.

    ignore_case: match the stem case-insensitively too (`IM01.PNG` for `im01`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    want = stem.lower() if ignore_case else stem
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and (p.stem.lower() if ignore_case else p.stem) == want)


def find_image(folder: Path, stem: str) -> Path | None:
    """The image in `folder` whose stem is `stem` (any extension, any case of it), or None; the first
    by name when several extensions share the stem (see `find_images`)."""
    found = find_images(folder, stem)
    return found[0] if found else None


def list_stems(folder: Path) -> list[str]:
    """Sorted stems of the images in `folder`."""
    return sorted({p.stem for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS})
