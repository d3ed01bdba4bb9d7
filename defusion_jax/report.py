"""Paper-style reports: summary tables (mean over images, best bold, second underlined, direction
arrows) and side-by-side comparison grids with zoomed crops."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from defusion_jax.metrics import parse_metric


def summarise(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """rows of {dataset, image, method, metric, value} -> {dataset: {method: {metric: mean}}}, plus 'ALL'."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        v = float(r["value"])
        if math.isnan(v):
            continue
        acc[r["dataset"]][r["method"]][r["metric"]].append(v)
        acc["ALL"][r["method"]][r["metric"]].append(v)
    datasets = sorted(d for d in acc if d != "ALL")
    if len(datasets) > 1:
        datasets.append("ALL")
    return {d: {m: {k: float(np.mean(v)) for k, v in acc[d][m].items()} for m in acc[d]} for d in datasets}


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.2f}"


def _ranks(values: dict[str, float], higher: bool | None) -> dict[str, int]:
    if higher is None:
        return {}
    ordered = sorted({v for v in values.values() if not math.isnan(v)}, reverse=higher)
    return {m: ordered.index(v) for m, v in values.items() if not math.isnan(v) and ordered.index(v) < 2}


def write_summary_csv(path: Path, summary, methods: list[str], metrics: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "method"] + metrics)
        for ds, by_method in summary.items():
            for m in methods:
                if m in by_method:
                    w.writerow([ds, m] + [repr(by_method[m].get(k, float("nan"))) for k in metrics])


def markdown_table(by_method: dict[str, dict[str, float]], methods: list[str], metrics: list[str]) -> str:
    """One methods x metrics table; best bold, second underlined, per the metric's direction."""
    heads = []
    for k in metrics:
        m, _ = parse_metric(k)
        heads.append(f"{k} {m.arrow}".strip())
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(metrics)]
    present = [m for m in methods if m in by_method]
    cells = {m: [] for m in present}
    for k in metrics:
        vals = {m: by_method[m].get(k, float("nan")) for m in present}
        ranks = _ranks(vals, parse_metric(k)[0].higher_is_better) if len(present) > 1 else {}
        for m in present:
            s = _fmt(vals[m])
            if ranks.get(m) == 0:
                s = f"**{s}**"
            elif ranks.get(m) == 1:
                s = f"<u>{s}</u>"
            cells[m].append(s)
    for m in present:
        lines.append(f"| {m} | " + " | ".join(cells[m]) + " |")
    return "\n".join(lines)


def write_summary_md(path: Path, summary, methods, metrics, header_lines: list[str]) -> str:
    parts = list(header_lines)
    for ds, by_method in summary.items():
        parts += ["", f"### {ds}" + (" (mean over all images)" if ds == "ALL" else ""), "",
                  markdown_table(by_method, methods, metrics)]
    parts += ["", "Best in **bold**, second <u>underlined</u>; ↑ higher is better, ↓ lower is better.", "",
              "| metric | convention |", "|---|---|"]
    for k in metrics:
        m, variant = parse_metric(k)
        parts.append(f"| {k} | {m.convention}" + (f" [variant: {variant}]" if variant != "default" else "") + " |")
    text = "\n".join(parts) + "\n"
    path.write_text(text, encoding="utf-8")
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
    s = max(8, int(min(h, w) * frac))
    gy, gx = np.gradient(g)
    e = np.sqrt(gx * gx + gy * gy)
    ii = np.pad(e.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    win = ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]
    t, l = np.unravel_index(int(np.argmax(win)), win.shape)
    return int(t), int(l), s


def compare_grid(tiles: list[tuple[str, np.ndarray]], crop: tuple[int, int, int] | None = None,
                 tile_w: int = 256) -> Image.Image:
    """Sources, ground truth and methods side by side (top row, crop outlined) with the zoomed crop below."""
    font = _font(14)
    h0, w0 = tiles[0][1].shape[:2]
    tile_h = max(1, round(h0 * tile_w / w0))
    if crop is None:
        crop = pick_crop([t[1] for t in tiles[:2]])
    t, l, s = crop
    label_h = 22
    canvas = Image.new("RGB", (len(tiles) * (tile_w + 4) + 4, label_h + tile_h + 4 + tile_w + 4), "white")
    draw = ImageDraw.Draw(canvas)
    sx, sy = tile_w / w0, tile_h / h0
    for i, (name, img) in enumerate(tiles):
        x0 = 4 + i * (tile_w + 4)
        im = Image.fromarray(_rgb8(img))
        full = im.resize((tile_w, tile_h), Image.LANCZOS)
        fd = ImageDraw.Draw(full)
        fd.rectangle([l * sx, t * sy, (l + s) * sx - 1, (t + s) * sy - 1], outline=(255, 0, 0), width=2)
        canvas.paste(full, (x0, label_h))
        zoom = im.crop((l, t, l + s, t + s))
        zoom = zoom.resize((tile_w, tile_w), Image.NEAREST if tile_w >= 2 * s else Image.LANCZOS)
        canvas.paste(zoom, (x0, label_h + tile_h + 4))
        text = name if draw.textlength(name, font=font) <= tile_w else name[: max(1, tile_w // 8)] + "…"
        draw.text((x0 + 2, 3), text, fill=(0, 0, 0), font=font)
    return canvas
