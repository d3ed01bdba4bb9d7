"""Finding and reading the images the metrics score (decoding is `defusion_jax.imageio`'s, as for `fuse`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from defusion_jax.imageio import PIL_SUFFIXES, TIFF_SUFFIXES, read_stored

from .color import as_stored

IMAGE_EXTS = PIL_SUFFIXES + TIFF_SUFFIXES


def _read_image(path) -> np.ndarray:
    """Read an image for scoring, as stored: uint8 or uint16, HxW (grey) or HxWx3 (RGB), or floats
    (float TIFFs), which must lie in [0, 1]; raises ValueError naming the file otherwise.

    The decoder is `imageio.read_stored`, the one `fuse` reads with: tifffile for TIFF (planar
    16-bit colour included), OpenCV for 16-bit PNG (kept 16-bit in colour too), EXIF orientation
    applied, alpha dropped. A float image outside [0, 1] (an exported function's raw output, say)
    is refused rather than rescaled by a guess.
    """
    arr, _ = read_stored(path)
    try:
        arr = as_stored(arr)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return arr[..., 0] if arr.shape[-1] == 1 else arr


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
