"""Image-fusion quality metrics (numpy/scipy, float64, CPU), matched to the field's published toolboxes.

Each metric's one-line source convention is the first docstring line of its function; see
`registry.METRICS` and docs/metrics.md.
"""
from __future__ import annotations

import numpy as np

from .color import channel_triplets, rgb2gray, to_float255
from .registry import METRICS, PAPER_SETS, SETS, Metric, parse_metric, resolve

__all__ = ["METRICS", "PAPER_SETS", "SETS", "Metric", "parse_metric", "resolve", "score", "rgb2gray"]


def _rgb01(x: np.ndarray) -> np.ndarray:
    x = to_float255(x) / 255.0
    return np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x


def score(a: np.ndarray, b: np.ndarray, f: np.ndarray, specs: list[str], color: str = "gray",
          gt: np.ndarray | None = None, clip=None) -> dict[str, float]:
    """Score fused image `f` against sources `a`, `b` (and `gt`) for each metric spec ('NAME[:variant]').

    Images are HxW or HxWx3 arrays, as read from disk. Accepted dtypes: uint8; uint16 (16-bit, x/257
    to the 8-bit scale); other integer dtypes holding 8-bit values in [0,255]; bool ({0,255}); float
    in [0,1]. Integers outside [0,255] and floats outside [0,1] (a float image in 0..255, say) raise
    ValueError instead of giving quietly wrong numbers. Metrics needing a ground truth are skipped
    (absent from the result) when `gt` is None; CLIPIQA needs a `clip` scorer. A metric that is
    undefined for the input (flat or too small images, see docs/metrics.md) is NaN.
    """
    shapes = {x.shape[:2] for x in (a, b, f) + ((gt,) if gt is not None else ())}
    if len(shapes) != 1:
        raise ValueError(f"image sizes differ: {sorted(shapes)}")
    planes = None
    gray = None
    out: dict[str, float] = {}
    for spec in specs:
        m, variant = parse_metric(spec)
        kw = {} if variant == "default" else {"variant": variant}
        if m.kind == "gt":
            if gt is None:
                continue
            out[spec] = float(m.fn(_rgb01(f), _rgb01(gt)))
        elif m.kind == "noref":
            if clip is None:
                continue
            out[spec] = float(clip(_rgb01(f)))
        elif m.kind == "gray":
            if gray is None:
                gray = channel_triplets(a, b, f, "gray")[0]
            out[spec] = float(m.fn(*gray, **kw))
        else:
            if planes is None:
                planes = channel_triplets(a, b, f, color)
            if m.per_channel_stack is not None and len(planes) > 1:
                out[spec] = float(m.per_channel_stack(planes))
            else:
                out[spec] = float(np.mean([m.fn(*p, **kw) for p in planes]))
    return out
