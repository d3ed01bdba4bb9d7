"""Paper-style reports: summary tables (mean over images, best bold, second underlined, direction
arrows) and side-by-side comparison grids with zoomed crops."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from defusion_jax.imageio import atomic_path, atomic_write_bytes
from defusion_jax.metrics import parse_metric


@dataclass
class Summary:
    """Per (dataset, method, metric): mean over the images with a value, how many had one (`counts`),
    how many were NaN (`nans`), and how many pairs a complete cell covers (`expected`, per dataset
    and metric). NaN values and missing images both lower the count; +-inf counts as a value."""

    means: dict[str, dict[str, dict[str, float]]]
    counts: dict[str, dict[str, dict[str, int]]]
    nans: dict[str, dict[str, dict[str, int]]]
    expected: dict[str, dict[str, int]]

    def items(self):
        return self.means.items()

    def complete(self, ds: str, method: str, metric: str) -> bool:
        n = self.counts.get(ds, {}).get(method, {}).get(metric, 0)
        return n >= self.expected.get(ds, {}).get(metric, 0) and n > 0


def summarise(rows: list[dict], n_pairs: dict[str, int] | None = None,
              n_gt_pairs: dict[str, int] | None = None) -> Summary:
    """rows of {dataset, image, method, metric, value} -> Summary of each dataset, plus 'ALL' (all images)
    when there is more than one dataset.

    n_pairs: pairs per dataset that every cell should cover (default: the distinct images in `rows`);
    n_gt_pairs: the same for ground-truth metrics (default: n_pairs).
    """
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    nans: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    images: dict = defaultdict(set)
    for r in rows:
        v = float(r["value"])
        images[r["dataset"]].add(r["image"])
        for d in (r["dataset"], "ALL"):
            if math.isnan(v):
                nans[d][r["method"]][r["metric"]] += 1
                acc[d][r["method"]][r["metric"]]  # the cell exists, with no value
            else:
                acc[d][r["method"]][r["metric"]].append(v)
    datasets = sorted(d for d in acc if d != "ALL")
    n_pairs = dict(n_pairs) if n_pairs is not None else {d: len(images[d]) for d in datasets}
    n_gt_pairs = dict(n_gt_pairs) if n_gt_pairs is not None else n_pairs
    if len(datasets) > 1:
        n_pairs["ALL"] = sum(n_pairs.get(d, 0) for d in datasets)
        n_gt_pairs["ALL"] = sum(n_gt_pairs.get(d, 0) for d in datasets)
        datasets.append("ALL")
    means, counts, expected = {}, {}, {}
    for d in datasets:
        means[d] = {m: {k: _mean(v) for k, v in acc[d][m].items()} for m in acc[d]}
        counts[d] = {m: {k: len(v) for k, v in acc[d][m].items()} for m in acc[d]}
        metrics = {k for m in acc[d] for k in acc[d][m]}
        expected[d] = {k: (n_gt_pairs if parse_metric(k)[0].kind == "gt" else n_pairs).get(d, 0) for k in metrics}
    return Summary(means, counts, {d: {m: dict(v) for m, v in nans[d].items()} for d in datasets}, expected)


def _mean(values: list[float]) -> float:
    if not values:
        return float("nan")
    with np.errstate(invalid="ignore"):  # inf + -inf: no meaningful mean
        return float(np.mean(values))


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if abs(v) < 0.01:
        return f"{v:.3g}"  # small values (Nabf, MSE) keep three significant digits rather than 0.0000
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.2f}"


def _ranks(values: dict[str, float], higher: bool | None) -> dict[str, int]:
    if higher is None:
        return {}
    ordered = sorted({v for v in values.values() if not math.isnan(v)}, reverse=higher)
    return {m: ordered.index(v) for m, v in values.items() if not math.isnan(v) and ordered.index(v) < 2}


def write_summary_csv(path: Path, summary: Summary, methods: list[str], metrics: list[str]) -> None:
    """dataset, method, the metric means, then `n:<metric>`: how many images each mean covers."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "method"] + metrics + [f"n:{k}" for k in metrics])
        for ds, by_method in summary.items():
            for m in methods:
                if m in by_method:
                    counts = summary.counts[ds][m]
                    w.writerow([ds, m] + [repr(by_method[m].get(k, float("nan"))) for k in metrics]
                               + [counts.get(k, 0) for k in metrics])


def markdown_table(summary: Summary, ds: str, methods: list[str], metrics: list[str]) -> str:
    """One methods x metrics table; best bold, second underlined, per the metric's direction.

    A cell covering fewer pairs than the dataset has shows `mean (n/N)` and is not ranked: its mean
    is over other images than its neighbours' and cannot be compared with them.
    """
    by_method = summary.means[ds]
    heads = []
    for k in metrics:
        m, _ = parse_metric(k)
        heads.append(f"{k} {m.arrow}".strip())
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(metrics)]
    present = [m for m in methods if m in by_method]
    cells = {m: [] for m in present}
    for k in metrics:
        vals = {m: by_method[m].get(k, float("nan")) for m in present}
        ranked = {m: v for m, v in vals.items() if summary.complete(ds, m, k)}
        ranks = _ranks(ranked, parse_metric(k)[0].higher_is_better) if len(ranked) > 1 else {}
        for m in present:
            s = _fmt(vals[m])
            if not summary.complete(ds, m, k):
                s += f" ({summary.counts[ds][m].get(k, 0)}/{summary.expected[ds].get(k, 0)})"
            elif ranks.get(m) == 0:
                s = f"**{s}**"
            elif ranks.get(m) == 1:
                s = f"<u>{s}</u>"
            cells[m].append(s)
    for m in present:
        lines.append(f"| {m} | " + " | ".join(cells[m]) + " |")
    return "\n".join(lines)


def coverage_notes(summary: Summary, methods: list[str], metrics: list[str]) -> list[str]:
    """Lines naming the cells that cover fewer pairs than their dataset, and the metrics that were NaN."""
    datasets = [d for d in summary.means if d != "ALL"]
    lines, nan_metrics = [], {}
    for m in methods:
        for k in metrics:
            parts, n_nan, n_missing = [], 0, 0
            for d in datasets:
                want = summary.expected[d].get(k, 0)
                n = summary.counts[d].get(m, {}).get(k, 0)
                nn = summary.nans[d].get(m, {}).get(k, 0)
                if nn:
                    nan_metrics[k] = nan_metrics.get(k, 0) + nn
                if want and n < want:
                    parts.append(f"{d} {n}/{want}" if len(datasets) > 1 else f"{n}/{want} pairs")
                    n_nan += nn
                    n_missing += max(0, want - n - nn)
            if parts:
                why = ", ".join(x for x in (f"{n_nan} NaN" if n_nan else "",
                                           f"{n_missing} not scored (missing or skipped image)" if n_missing else "") if x)
                lines.append(f"{m} / {k}: {', '.join(parts)} ({why})")
    out = []
    if lines:
        out += ["Incomplete cells (shown as `mean (n/N)`, not ranked): a mean over fewer images than the others "
                "is over a different subset, often an easier or harder one, so it cannot be compared with them."]
        out += [f"  - {x}" for x in lines]
    if nan_metrics:
        out.append("NaN for some images (undefined there: flat or too small images, see docs/metrics.md): "
                   + ", ".join(f"{k} ({n} value{'s' if n != 1 else ''})" for k, n in nan_metrics.items()) + ".")
    return out


def write_summary_md(path: Path, summary: Summary, methods, metrics, header_lines: list[str]) -> str:
    parts = list(header_lines)
    for ds in summary.means:
        parts += ["", f"### {ds}" + (" (mean over all images)" if ds == "ALL" else ""), "",
                  markdown_table(summary, ds, methods, metrics)]
    parts += ["", "Best in **bold**, second <u>underlined</u>; ↑ higher is better, ↓ lower is better."]
    notes = coverage_notes(summary, methods, metrics)
    if notes:
        parts += [""] + [n if n.startswith("  ") else f"- {n}" for n in notes]
    parts += ["", "| metric | convention |", "|---|---|"]
    for k in metrics:
        m, variant = parse_metric(k)
        parts.append(f"| {k} | {m.convention}" + (f" [variant: {variant}]" if variant != "default" else "") + " |")
    text = "\n".join(parts) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return text


# ------------------------------------------------------------------------------ compare grids
def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def _rgb8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint16:
        x = (x.astype(np.float64) / 257.0).round().astype(np.uint8)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    return x


def pick_crop(images: list[np.ndarray], frac: float = 0.25) -> tuple[int, int, int]:
    """(top, left, size) of the square window with the most gradient energy in the mean source image."""
    g = np.mean([_rgb8(x).astype(np.float32).mean(axis=2) for x in images], axis=0)
    h, w = g.shape
    s = min(max(8, int(min(h, w) * frac)), h, w)  # tiny images: the whole image
    gy = np.gradient(g, axis=0) if h > 1 else np.zeros_like(g)
    gx = np.gradient(g, axis=1) if w > 1 else np.zeros_like(g)
    e = np.sqrt(gx * gx + gy * gy)
    ii = np.pad(e.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    win = ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]
    t, l = np.unravel_index(int(np.argmax(win)), win.shape)
    return int(t), int(l), s


def compare_grid(tiles: list[tuple[str, np.ndarray]], crop: tuple[int, int, int] | None = None,
                 tile_w: int = 256) -> Image.Image:
    """Sources, ground truth and methods side by side (top row, crop outlined) with the zoomed crop below.

    Each whole image is `tile_w` wide, or at most twice that high (then narrower, centred): a tall,
    thin image would otherwise make a canvas tens of thousands of pixels high."""
    font = _font(14)
    h0, w0 = tiles[0][1].shape[:2]
    full_w, full_h = tile_w, max(1, round(h0 * tile_w / w0))
    if full_h > 2 * tile_w:
        full_w, full_h = max(1, round(w0 * 2 * tile_w / h0)), 2 * tile_w
    if crop is None:
        crop = pick_crop([t[1] for t in tiles[:2]])
    t, l, s = crop
    label_h = 22
    canvas = Image.new("RGB", (len(tiles) * (tile_w + 4) + 4, label_h + full_h + 4 + tile_w + 4), "white")
    draw = ImageDraw.Draw(canvas)
    sx, sy = full_w / w0, full_h / h0
    for i, (name, img) in enumerate(tiles):
        x0 = 4 + i * (tile_w + 4)
        im = Image.fromarray(_rgb8(img))
        full = im.resize((full_w, full_h), Image.LANCZOS)
        fd = ImageDraw.Draw(full)
        fd.rectangle([l * sx, t * sy, (l + s) * sx - 1, (t + s) * sy - 1], outline=(255, 0, 0), width=2)
        canvas.paste(full, (x0 + (tile_w - full_w) // 2, label_h))
        zoom = im.crop((l, t, l + s, t + s))
        zoom = zoom.resize((tile_w, tile_w), Image.NEAREST if tile_w >= 2 * s else Image.LANCZOS)
        canvas.paste(zoom, (x0, label_h + full_h + 4))
        text = name if draw.textlength(name, font=font) <= tile_w else name[: max(1, tile_w // 8)] + "…"
        draw.text((x0 + 2, 3), text, fill=(0, 0, 0), font=font)
    return canvas
