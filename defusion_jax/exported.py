"""Load a DeFusion++ fusion function written by `python -m defusion_jax.export`.

    from defusion_jax.exported import load      # or copy this one file next to your code
    f = load("defusionpp_export/")
    fused = f(a, b)     # NHWC float32 in [0,1], H and W multiples of 16 -> NHWC float32

Inputs: floats in [0, 1] (NaN, inf or values outside [0, 1] by more than 1e-3 are a ValueError),
or uint8 / uint16, divided by 255 / 65535; other integer types and bool are a TypeError
(`as_unit_float`, the same rule as `defusion_jax.api.FusionModel`).

This module imports only the standard library, numpy and jax: it works where the rest of
defusion_jax (and flax) is not installed. Copy it anywhere and `import exported`.

The folder holds `manifest.json` (input layout, value range, padding rule, versions),
`fuse.jax` (a `jax.export` serialization of `f(params, a, b)` with symbolic batch, height and
width, lowered for the platforms listed in the manifest) and `weights.npz` (the parameters, read
with `allow_pickle=False`; passed to the function as an argument, not baked into it).

SECURITY: the serialized function is trusted input. `jax.export.deserialize` compiles and runs
the StableHLO it finds; load only folders you made yourself or got from someone you trust.

The output is the network's raw linear prediction (mostly in [0,1]; clip before saving). Images
of other sizes (the manifest's `padding_rule`; `python -m defusion_jax.fuse` does this for you):

    eh, ew = (-(H + 32)) % 16, (-(W + 32)) % 16
    mode = "reflect" if 16 + eh < H and 16 + ew < W else "symmetric"   # tiny images
    x = np.pad(x, ((16, 16 + eh), (16, 16 + ew), (0, 0)), mode=mode)   # H x W x 3
    fused = f(xa[None], xb[None])[0, 16:16 + H, 16:16 + W]
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "defusion_jax.exported/1"
MANIFEST = "manifest.json"


RANGE_TOLERANCE = 1e-3  # float inputs may stray this far outside [0, 1] (rounding), no further


class ExportedModelError(ValueError):
    """An export folder that cannot be used; the message says why in one line."""


def _is_float(dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16" or dtype.name.startswith("float8")


def as_unit_float(x, name: str = "image"):
    """`x` as float32 in [0, 1]: the input rule of `ExportedFusion`, `FusionModel` and
    `inference.fuse_arrays` (defined here because this module must run without the package).

    uint8 is divided by 255 and uint16 by 65535 (what `np.asarray(Image.open(...))` gives);
    other integer types and bool raise TypeError (their scale is a guess); floats with NaN or
    inf, or outside [0, 1] by more than `RANGE_TOLERANCE`, raise ValueError. A jax array stays
    one (on its device); inside a jit trace only the dtype can be checked.
    """
    import sys

    jax = sys.modules.get("jax")  # only a jax array needs jax; do not import it for numpy input
    on_device = jax is not None and isinstance(x, jax.Array)
    if not on_device and not isinstance(x, np.ndarray):
        x = np.asarray(x)
    dtype = np.dtype(x.dtype)
    xp = np
    if on_device:
        import jax.numpy as xp
    if dtype.kind == "u" and dtype.itemsize in (1, 2):  # either byte order: Pillow gives '>u2' for I;16B
        return x.astype(xp.float32) / xp.float32(255 if dtype.itemsize == 1 else 65535)
    if not _is_float(dtype):
        raise TypeError(f"{name}: {dtype} samples are not supported (their scale is ambiguous); pass floats "
                        "in [0, 1], uint8 (divided by 255) or uint16 (divided by 65535)")
    x = x.astype(xp.float32)
    if (on_device and isinstance(x, jax.core.Tracer)) or x.size == 0:
        return x
    finite, lo, hi = (np.asarray(v).item() for v in (xp.isfinite(x).all(), x.min(), x.max()))
    if not finite:
        bad = int(x.size - np.asarray(xp.isfinite(x).sum()).item())
        raise ValueError(f"{name}: {bad} of {x.size} values are NaN or infinite")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = " (8-bit data as floats? divide by 255; 16-bit: by 65535)" if hi > 10 else ""
        raise ValueError(f"{name}: values span [{lo:.4g}, {hi:.4g}], expected floats in [0, 1]{hint}")
    return x


def nchw_hint(shape) -> str:
    """A hint for the most common layout mistake, or ''."""
    if len(shape) == 4 and shape[-1] != 3 and shape[1] in (1, 3):
        return f"; {tuple(shape)} looks like NCHW: pass x.transpose(0, 2, 3, 1)"
    return ""


def is_export_dir(path: str | os.PathLike) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format", "").startswith("defusion_jax.exported/")
    except (OSError, ValueError, AttributeError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _backend_platforms() -> set[str]:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "gpu":  # jax names the backend 'gpu'; exports name cuda / rocm
        version = str(getattr(dev.client, "platform_version", "")).lower()
        return {"rocm"} if "rocm" in version else {"cuda"}
    return {dev.platform}


class ExportedFusion:
    """`f(a, b) -> fused` from an export folder; compiled once per input shape."""

    patch = 16

    def __init__(self, directory: str | os.PathLike, *, verify: bool = True):
        import jax
        from jax import export

        self.directory = Path(directory)
        if not self.directory.exists():
            raise ExportedModelError(f"{self.directory}: no such folder")
        if not self.directory.is_dir():
            raise ExportedModelError(f"{self.directory}: not a folder (an export is a folder with {MANIFEST})")
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise ExportedModelError(f"{self.directory}: no {MANIFEST} (not an export folder)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise ExportedModelError(f"{manifest_path}: unreadable manifest ({e})") from None
        fmt = self.manifest.get("format")
        if fmt != FORMAT:
            raise ExportedModelError(f"{self.directory}: export format {fmt!r}, this loader reads {FORMAT!r}")
        files = self.manifest.get("files", {})
        fn_path = self.directory / files.get("function", "fuse.jax")
        w_path = self.directory / files.get("weights", "weights.npz")
        for p in (fn_path, w_path):
            if not p.is_file():
                raise ExportedModelError(f"{self.directory}: {p.name} is missing")
        if verify:
            for p in (fn_path, w_path):
                want = self.manifest.get("sha256", {}).get(p.name)
                if want and _sha256(p) != want:
                    raise ExportedModelError(f"{p}: checksum differs from the manifest (damaged or replaced file)")
        try:
            self.exported = export.deserialize(bytearray(fn_path.read_bytes()))
        except Exception as e:
            raise ExportedModelError(f"{fn_path}: cannot deserialize ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}); the jax that wrote it "
                                     f"was {self.manifest.get('versions', {}).get('jax')}, this is {jax.__version__}") from None
        here = _backend_platforms()
        if not here & set(self.exported.platforms):
            raise ExportedModelError(f"{self.directory}: exported for {', '.join(self.exported.platforms)}, "
                                     f"but this jax runs on {', '.join(sorted(here))}; re-export with "
                                     "--platforms including it")
        try:
            with np.load(w_path, allow_pickle=False) as z:
                flat = {k: np.asarray(z[k]) for k in z.files}
        except Exception as e:
            raise ExportedModelError(f"{w_path}: unreadable weights ({e})") from None
        self.params = jax.device_put(_nest(flat))
        self._call = jax.jit(self.exported.call)
        self.max_side = int(self.manifest.get("inputs", {}).get("max_side", 1 << 30))

    def __repr__(self):
        return f"ExportedFusion({str(self.directory)!r}, platforms={self.exported.platforms})"

    def __call__(self, a, b):
        """Fused image (raw prediction) of two NHWC batches in [0,1], H, W multiples of 16
        (float, or uint8 / uint16 scaled by 255 / 65535: `as_unit_float`)."""
        a, b = as_unit_float(a, "a"), as_unit_float(b, "b")
        if a.ndim != 4 or a.shape != b.shape:
            raise ValueError(f"expected two NHWC batches of one shape, got {a.shape} and {b.shape}{nchw_hint(a.shape)}")
        if a.shape[-1] != 3:
            raise ValueError(f"expected 3 channels (RGB; replicate grey images), got {a.shape[-1]}{nchw_hint(a.shape)}")
        h, w = a.shape[1], a.shape[2]
        if h % self.patch or w % self.patch or h == 0 or w == 0:
            raise ValueError(f"height and width must be positive multiples of {self.patch}, got {h}x{w}; "
                             "pad as the manifest's padding_rule says")
        if max(h, w) > self.max_side:
            raise ValueError(f"{h}x{w} exceeds the exported maximum side of {self.max_side} px; use tiles")
        return self._call(self.params, a, b)


def load(directory: str | os.PathLike, *, verify: bool = True) -> ExportedFusion:
    """The fusion function stored in `directory` (see the module docstring)."""
    return ExportedFusion(directory, verify=verify)
