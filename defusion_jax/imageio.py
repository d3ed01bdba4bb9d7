"""Reading and writing the images users bring, for fusion and evaluation.

    from defusion_jax.imageio import read_image, write_image
    img = read_image("ir.tif")        # ImageData(pixels=HxWxC float32 in [0,1], bit_depth=16, notes=())
    write_image("fused.png", x, bit_depth=img.bit_depth)

Formats: PNG, JPEG, BMP, TIFF (8- and 16-bit unsigned, or float), `.npy` (HxW or HxWxC; floats kept
exactly as stored, uint8/uint16 scaled). Grey sources come back with one channel, colour with
three; an alpha channel is dropped and said so in `notes`; EXIF orientation is applied, so pixels
are what a viewer shows. Decoders: JPEG/BMP/8-bit PNG with Pillow (what the official test script
reads with), 16-bit PNG with OpenCV (Pillow reduces 16-bit colour PNGs to 8 bits), TIFF with
tifffile (Pillow as a fallback for photometrics tifffile hands back raw, e.g. CMYK).

Every write goes to a hidden temporary name in the target folder and is renamed over the target
(`os.replace`), so a file with the final name is always complete, even after a crash.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES + (".npy",)
# Bit depths each output format can hold; 32 means float32 samples.
WRITE_DEPTHS = {".png": (8, 16), ".jpg": (8,), ".jpeg": (8,), ".bmp": (8,), ".tif": (8, 16, 32),
                ".tiff": (8, 16, 32), ".npy": (32,)}
TEMP_MARK = ".partial-"  # temporary files are named `.<name>.partial-<random><suffix>`
EXIF_ORIENTATION = 0x0112


class ImageReadError(ValueError):
    """An image that cannot be used; the message says which file and why, in one line."""


@dataclass(frozen=True)
class ImageData:
    pixels: np.ndarray  # float32 (H, W, C), C = 1 (grey) or 3 (RGB)
    bit_depth: int  # 8 or 16 (integer samples), 32 (float samples)
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]


def is_image_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


# ---- reading ---------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> ImageData:
    """Decode one image file; raises `ImageReadError` (one line) for anything unusable."""
    arr, notes = read_stored(path)
    path = Path(path)
    pixels, depth = _to_float(arr, path)
    if depth == 32 and not np.isfinite(pixels).all():  # one NaN would turn the whole fused image black
        bad = pixels.size - int(np.isfinite(pixels).sum())
        raise ImageReadError(f"{path}: {bad} of {pixels.size} float samples are NaN or infinite; "
                             "only finite values can be fused")
    if depth == 32 and pixels.size and (pixels.min() < 0 or pixels.max() > 1):
        notes.append(f"float values span [{pixels.min():.3g}, {pixels.max():.3g}], outside [0, 1]; kept as is")
    return ImageData(np.ascontiguousarray(pixels), depth, tuple(notes))


def read_stored(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Decode one image file into its samples as stored: (H, W, 1 or 3) uint8, uint16, bool or
    float, native byte order, alpha dropped, EXIF orientation applied; and the notes. What
    `read_image` scales to [0, 1], and what the metrics score (they take 8- and 16-bit data as is)."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if not path.is_file():
        raise ImageReadError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(f"{path}: unsupported file type {path.suffix!r} "
                             f"(expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        if suffix == ".npy":
            arr, notes = _read_npy(path), []
            orientation = 1
        elif suffix in TIFF_SUFFIXES:
            arr, orientation, notes = _read_tiff(path)
        elif suffix == ".png" and _png_bit_depth(path) == 16:
            arr, orientation, notes = _read_png16(path)
        else:
            arr, orientation, notes = _read_pil(path)
    except ImageReadError:
        raise
    except Exception as e:  # decoders raise many types for truncated or corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"{path}: cannot decode image ({msg})") from None
    arr, more = _standardize(arr, path)
    notes += more
    if orientation not in (None, 1):
        arr = apply_orientation(arr, orientation)
        notes.append(f"EXIF orientation {orientation} applied")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"{path}: empty image ({arr.shape[0]}x{arr.shape[1]})")
    if not arr.dtype.isnative:  # big-endian TIFF / .npy samples: '>u2' is uint16 all the same
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, notes


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels (H, W, ...) into displayed pixels for an EXIF orientation 1..8
    (the transposes of Pillow's `ImageOps.exif_transpose`)."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    if orientation not in ops:
        return arr
    return np.ascontiguousarray(ops[orientation](arr))


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None  # not a PNG at all: let the generic decoder say so
    return head[24]


def _exif_orientation(path: Path) -> int | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.getexif().get(EXIF_ORIENTATION)
    except Exception:
        return None


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ImageReadError(f"{path}: not a readable .npy array ({str(e).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray):
        raise ImageReadError(f"{path}: expected one array")
    return arr


def _read_png16(path: Path):
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(f"{path}: cannot decode image (corrupt or truncated PNG)")
    if arr.ndim == 3:  # OpenCV hands back BGR / BGRA
        arr = arr[..., [2, 1, 0, 3][:arr.shape[-1]]]
    return arr, _exif_orientation(path), []


def _read_tiff(path: Path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ImageReadError(f"{path}: cannot decode image (TIFF without pages)")
        page = tif.pages[0]
        photometric = getattr(page.photometric, "name", str(page.photometric))
        if photometric not in ("MINISBLACK", "MINISWHITE", "RGB", "PALETTE"):
            arr, orientation, notes = _read_pil(path)  # CMYK, YCbCr, ...: Pillow converts to RGB
            return arr, orientation, notes + [f"TIFF photometric {photometric} decoded by Pillow"]
        arr = page.asarray()
        axes = page.axes
        orientation_tag = page.tags.get("Orientation")
        orientation = int(orientation_tag.value) if orientation_tag is not None else None
        colormap = page.colormap if photometric == "PALETTE" else None
        notes = [] if len(tif.pages) == 1 else [f"first of {len(tif.pages)} TIFF pages used"]
    if "S" in axes and axes.index("S") < axes.index("Y"):  # planar storage: samples first
        arr = np.moveaxis(arr, axes.index("S"), -1)
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if photometric == "MINISWHITE" and arr.dtype.kind == "u":
        arr = np.iinfo(arr.dtype).max - arr
    if colormap is not None:
        arr = np.moveaxis(np.asarray(colormap)[:, arr], 0, -1)  # uint16 RGB
    return arr, orientation, notes


def _read_pil(path: Path):
    from PIL import Image

    notes = []
    with Image.open(path) as im:
        im.load()
        orientation = im.getexif().get(EXIF_ORIENTATION)
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode == "PA":
            im = im.convert("RGBA")
        elif mode == "1":
            im = im.convert("L")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
            im = im.convert("RGB")
            notes.append(f"{mode} converted to RGB")
        arr = np.asarray(im)
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    elif mode == "I":  # 32-bit integer samples, what Pillow makes of some 16-bit greys
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageReadError(f"{path}: 32-bit integer samples are not supported")
        arr = arr.astype(np.uint16)
    return arr, orientation, notes


def _standardize(arr: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    """-> (H, W, 1 or 3), alpha dropped."""
    notes = []
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageReadError(f"{path}: expected an HxW or HxWxC image with C in 1-4, got shape {arr.shape}")
    if arr.shape[-1] in (2, 4):
        arr = arr[..., :-1]
        notes.append("alpha channel dropped")
    return arr, notes


def _to_float(arr: np.ndarray, path: Path) -> tuple[np.ndarray, int]:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255), 8
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535), 16
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), 8
    if arr.dtype.kind == "f":
        return arr.astype(np.float32), 32
    raise ImageReadError(f"{path}: unsupported sample type {arr.dtype} (expected uint8, uint16 or float)")


# ---- writing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same suffix); renamed onto `path` on success,
    removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}{TEMP_MARK}", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files an interrupted writer left in `folder`; returns them."""
    gone = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and TEMP_MARK in p.name and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    gone.append(p)
    return gone


def quantize(x: np.ndarray, bit_depth: int) -> np.ndarray:
    """[0,1] floats -> uint8 / uint16 (clipped, rounded to nearest); ValueError for NaN or inf."""
    if bit_depth not in (8, 16):
        raise ValueError(f"integer bit depth must be 8 or 16, got {bit_depth}")
    top = 255 if bit_depth == 8 else 65535
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():  # a cast would turn NaN into 0 (black) with only a RuntimeWarning
        raise ValueError(f"cannot write {x.size - int(np.isfinite(x).sum())} NaN or infinite sample(s) "
                         f"as {bit_depth}-bit integers")
    q = np.rint(np.clip(x, 0.0, 1.0) * top)
    return q.astype(np.uint8 if bit_depth == 8 else np.uint16)


def write_image(path: str | os.PathLike, x: np.ndarray, bit_depth: int = 8, *, jpeg_quality: int = 95) -> Path:
    """Write an (H, W) or (H, W, 1|3) image in [0,1] atomically; the suffix picks the format.

    `bit_depth`: 8 or 16 (integer samples, clipped to [0,1]) or 32 (float32 samples, stored as
    is: `.npy` and TIFF only). `.npy` always stores float32.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_DEPTHS:
        raise ValueError(f"{path}: cannot write {path.suffix!r} files (use one of {', '.join(WRITE_DEPTHS)})")
    x = np.asarray(x, np.float32)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] != 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {x.shape}")
    if suffix == ".npy":
        bit_depth = 32
    if bit_depth not in WRITE_DEPTHS[suffix]:
        raise ValueError(f"{path}: {path.suffix} cannot hold {bit_depth}-bit samples "
                         f"(supported: {WRITE_DEPTHS[suffix]})")
    writer: Callable[[Path], None]
    if suffix == ".npy":
        def writer(tmp):
            with open(tmp, "wb") as f:
                np.save(f, x, allow_pickle=False)
    elif suffix in TIFF_SUFFIXES:
        import tifffile

        data = x if bit_depth == 32 else quantize(x, bit_depth)

        def writer(tmp):
            tifffile.imwrite(tmp, data, photometric="rgb" if data.ndim == 3 else "minisblack")
    elif suffix == ".png":
        import cv2

        data = quantize(x, bit_depth)
        if data.ndim == 3:
            data = data[..., ::-1]  # OpenCV wants BGR

        def writer(tmp):
            ok, buf = cv2.imencode(".png", np.ascontiguousarray(data))
            if not ok:
                raise OSError(f"PNG encoding failed for {path}")
            tmp.write_bytes(buf.tobytes())
    else:
        from PIL import Image

        data = quantize(x, 8)
        fmt = "JPEG" if suffix in (".jpg", ".jpeg") else "BMP"
        extra = {"quality": jpeg_quality} if fmt == "JPEG" else {}

        def writer(tmp):
            buf = io.BytesIO()
            Image.fromarray(data).save(buf, format=fmt, **extra)
            tmp.write_bytes(buf.getvalue())
    with atomic_path(path) as tmp:
        writer(tmp)
    return path
