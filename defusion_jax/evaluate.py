"""Score fusion results the way the field does and write paper-style reports.

    python -m defusion_jax.evaluate --task {ivf,mef,mff} --pairs DIR --out OUT
        [--fused NAME=DIR ...] [--baseline NAME ...] [--model PATH] [--gt DIR]
        [--metrics LIST] [--color {gray,per-channel}] [--clip-weights PATH] [--workers N]

DIR is a dataset folder holding the two source folders (ivf: ir/vi, mef: under/over, mff: A/B),
or a folder of such dataset folders (one level), or the data root holding <task>/ folders.
Fused images are matched to pairs by file stem, in FUSED/<dataset>/ or directly in FUSED/.
`--fused NAME` without '=' is the same as `--baseline NAME`. Writes OUT/per_image.csv,
OUT/summary.csv, OUT/summary.md, OUT/compare/*.png and the fused images of baselines and of
--model under OUT/fused/<method>/<dataset>/.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROLES = {"ivf": ("ir", "vi"), "mef": ("under", "over"), "mff": ("A", "B")}
GT_DIRS = ("GT", "gt")


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


@dataclass(frozen=True)
class Item:
    dataset: str
    stem: str
    a: str
    b: str
    gt: str | None

    def image_id(self, multi: bool) -> str:
        return f"{self.dataset}/{self.stem}" if multi else self.stem


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "dir" or "baseline"
    source: str  # folder or baseline name


# ------------------------------------------------------------------------------------ discovery
def discover(pairs: Path, task: str, gt: Path | None) -> list[Item]:
    from defusion_jax.metrics.io import find_image, list_stems

    ra, rb = ROLES[task]
    if not pairs.is_dir():
        raise UsageError(f"--pairs {pairs} is not a folder")
    if (pairs / task).is_dir() and not (pairs / ra).is_dir():
        pairs = pairs / task
    if (pairs / ra).is_dir() and (pairs / rb).is_dir():
        datasets = [pairs]
    else:
        datasets = sorted(d for d in pairs.iterdir() if (d / ra).is_dir() and (d / rb).is_dir())
    if not datasets:
        raise UsageError(f"--pairs {pairs}: no '{ra}/' and '{rb}/' folders for task {task} (here or one level down)")
    items = []
    for d in datasets:
        gt_dir = None
        if gt is not None:
            gt_dir = gt / d.name if (gt / d.name).is_dir() else gt
        else:
            gt_dir = next((d / g for g in GT_DIRS if (d / g).is_dir()), None)
        sa, sb = set(list_stems(d / ra)), set(list_stems(d / rb))
        for stem in sorted(sa - sb) + sorted(sb - sa):
            print(f"warning: {d.name}/{stem} has only one source; skipped", file=sys.stderr)
        for stem in sorted(sa & sb):
            g = find_image(gt_dir, stem) if gt_dir is not None else None
            items.append(Item(d.name, stem, str(find_image(d / ra, stem)), str(find_image(d / rb, stem)),
                              str(g) if g else None))
    if not items:
        raise UsageError(f"--pairs {pairs}: no image pairs found")
    return items


def fused_path(folder: str, item: Item) -> Path | None:
    from defusion_jax.metrics.io import find_image

    for d in (Path(folder) / item.dataset, Path(folder)):
        if d.is_dir():
            p = find_image(d, item.stem)
            if p is not None:
                return p
    return None


# ------------------------------------------------------------------------------------- scoring
def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def score_item(job: dict) -> dict:
    """Worker: fuse with baselines, score every method on one pair, draw its compare grid."""
    import cv2

    from defusion_jax import baselines, report
    from defusion_jax.metrics import score
    from defusion_jax.metrics.io import _read_image

    cv2.setNumThreads(1)
    item: Item = job["item"]
    out = Path(job["out"])
    a, b = _read_image(item.a), _read_image(item.b)
    gt = _read_image(item.gt) if item.gt else None
    rows, warnings, tiles = [], [], []
    for m in job["methods"]:
        if m.kind == "baseline":
            f = baselines.run_baseline(m.source, a, b)
            _save_png(out / "fused" / m.name / item.dataset / f"{item.stem}.png", f)
        else:
            p = fused_path(m.source, item)
            if p is None:
                warnings.append(f"{m.name}: no fused image for {item.dataset}/{item.stem}")
                continue
            f = _read_image(p)
        if f.shape[:2] != a.shape[:2]:
            warnings.append(f"{m.name}: {item.dataset}/{item.stem} is {f.shape[1]}x{f.shape[0]}, "
                            f"sources are {a.shape[1]}x{a.shape[0]}; skipped")
            continue
        tiles.append((m.name, f))
        for k, v in score(a, b, f, job["specs"], color=job["color"], gt=gt).items():
            rows.append({"dataset": item.dataset, "image": item.image_id(job["multi"]), "method": m.name,
                         "metric": k, "value": v})
    if job["compare"] and tiles:
        ra, rb = ROLES[job["task"]]
        head = [(ra, a), (rb, b)] + ([("GT", gt)] if gt is not None else [])
        name = f"{item.dataset}__{item.stem}.png" if job["multi"] else f"{item.stem}.png"
        (out / "compare").mkdir(parents=True, exist_ok=True)
        report.compare_grid(head + tiles).save(out / "compare" / name)
    return {"rows": rows, "warnings": warnings}


def fuse_with_model(model_path: str, items: list[Item], task: str, out: Path, name: str) -> Path:
    """Fuse every pair with the DeFusion++ network; the PNGs are then scored like any fused folder."""
    try:
        from defusion_jax.api import load_model
    except ImportError as exc:
        raise UsageError(f"--model needs the DeFusion++ network code (defusion_jax.api), which failed to import: {exc}")
    from tqdm import tqdm

    from defusion_jax.metrics.io import _read_image

    try:
        model = load_model(model_path)
    except Exception as exc:  # noqa: BLE001 - any load failure is a user-facing input problem
        raise UsageError(f"--model {model_path}: {exc}")

    def to01(x):
        x = x.astype(np.float32) / (65535.0 if x.dtype == np.uint16 else 255.0)
        return np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x

    root = out / "fused" / name
    for it in tqdm(items, desc=f"fusing with {name}", unit="pair"):
        f = model.fuse_image(to01(_read_image(it.a)), to01(_read_image(it.b)), task)
        _save_png(root / it.dataset / f"{it.stem}.png",
                  np.clip(np.rint(np.asarray(f) * 255.0), 0, 255).astype(np.uint8))
    return root


def clip_scores(weights: str, items, methods, out: Path, multi: bool) -> list[dict]:
    from defusion_jax.metrics.clipiqa import ClipIQA
    from defusion_jax.metrics.io import _read_image
    from defusion_jax.metrics import _rgb01

    try:
        scorer = ClipIQA(weights)
    except Exception as exc:  # noqa: BLE001 - missing package or unreadable weights: a user-facing problem
        raise UsageError(f"CLIPIQA: cannot load {weights}: {exc}")
    rows = []
    for it in items:
        for m in methods:
            p = (out / "fused" / m.name / it.dataset / f"{it.stem}.png") if m.kind == "baseline" else fused_path(m.source, it)
            if p is None or not Path(p).exists():
                continue
            rows.append({"dataset": it.dataset, "image": it.image_id(multi), "method": m.name,
                         "metric": "CLIPIQA", "value": float(scorer(_rgb01(_read_image(p))))})
    return rows


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from defusion_jax.baselines import BASELINES

    p = argparse.ArgumentParser(prog="python -m defusion_jax.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--task", required=True, choices=sorted(ROLES))
    p.add_argument("--pairs", required=True, type=Path, help="dataset folder, folder of datasets, or data root")
    # Both options feed one list so methods keep their command-line order in tables and grids.
    p.add_argument("--fused", dest="methods", action="append", default=[], metavar="NAME=DIR",
                   type=lambda s: ("fused", s), help="a method's fused images (repeatable); a bare NAME is a baseline")
    p.add_argument("--baseline", dest="methods", action="append", metavar="NAME", type=lambda s: ("baseline", s),
                   help=f"classical baseline fused on the fly (repeatable): {', '.join(BASELINES)}")
    p.add_argument("--model", help="DeFusion++ checkpoint to fuse with on the fly (method name DeFusion++)")
    p.add_argument("--gt", type=Path, help="ground-truth folder (by stem; default: a GT/ folder in the dataset)")
    p.add_argument("--metrics", default="paper",
                   help="comma list of metrics NAME[:variant] and sets: paper (per task), vifb, ivf, tang2022, all")
    p.add_argument("--color", default="gray", choices=["gray", "per-channel"],
                   help="gray: MATLAB rgb2gray with rounding; per-channel: VIFB's mean over RGB channels")
    p.add_argument("--clip-weights", help="OpenAI CLIP RN50 weights for CLIPIQA (not shipped; CLIPIQA is skipped without)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--no-compare", action="store_true", help="do not draw compare grids")
    return p


def run(args) -> int:
    from tqdm import tqdm

    from defusion_jax import report
    from defusion_jax.baselines import BASELINES
    from defusion_jax.metrics import parse_metric, resolve

    notes: list[str] = []
    requested = [s.strip() for s in args.metrics.split(",") if s.strip()]
    try:
        specs = resolve(requested, args.task)
    except ValueError as exc:
        raise UsageError(str(exc))
    if "CLIPIQA" in specs and not args.clip_weights:
        if "CLIPIQA" in requested:
            from defusion_jax.metrics.clipiqa import ABSENT

            raise UsageError(ABSENT)
        specs.remove("CLIPIQA")
        notes.append("CLIPIQA not computed: no CLIP RN50 weights given (--clip-weights PATH).")
    if args.clip_weights and not Path(args.clip_weights).is_file():
        raise UsageError(f"--clip-weights {args.clip_weights}: no such file")

    items = discover(args.pairs, args.task, args.gt)
    if args.gt is not None and not args.gt.is_dir():
        raise UsageError(f"--gt {args.gt} is not a folder")
    gt_specs = [s for s in specs if parse_metric(s)[0].kind == "gt"]
    if gt_specs and not any(it.gt for it in items):
        specs = [s for s in specs if s not in gt_specs]
        notes.append(f"{', '.join(gt_specs)} not computed: no ground truth (--gt DIR or a GT/ folder).")
    if not specs:
        raise UsageError("no metric left to compute")
    multi = len({it.dataset for it in items}) > 1

    methods: list[Method] = []
    for opt, spec in args.methods:
        name, eq, folder = spec.partition("=")
        if opt == "fused" and eq:
            if not name or not Path(folder).is_dir():
                raise UsageError(f"--fused {spec}: expected NAME=DIR with an existing folder")
            methods.append(Method(name, "dir", folder))
        elif spec in BASELINES:
            methods.append(Method(spec, "baseline", spec))
        else:
            raise UsageError(f"unknown baseline {spec!r}; choose from {', '.join(BASELINES)} (or give --fused NAME=DIR)")
    if args.model:
        if not Path(args.model).exists():
            raise UsageError(f"--model {args.model}: no such file or folder")
        root = fuse_with_model(args.model, items, args.task, args.out, "DeFusion++")
        methods.append(Method("DeFusion++", "dir", str(root)))
    names = [m.name for m in methods]
    if not methods:
        raise UsageError("nothing to evaluate: give --fused NAME=DIR, --baseline NAME or --model PATH")
    if len(set(names)) != len(names):
        raise UsageError(f"method names must be unique, got {names}")

    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [{"item": it, "methods": methods, "specs": [s for s in specs if s != "CLIPIQA"], "color": args.color,
             "out": str(args.out), "multi": multi, "task": args.task, "compare": not args.no_compare} for it in items]
    rows, warnings = [], []
    workers = max(1, min(args.workers, len(jobs)))
    bar = tqdm(total=len(jobs), desc="scoring", unit="pair")
    if workers == 1:
        results = map(score_item, jobs)
        for r in results:
            rows += r["rows"]
            warnings += r["warnings"]
            bar.update()
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap(score_item, jobs):
                rows += r["rows"]
                warnings += r["warnings"]
                bar.update()
    bar.close()
    if "CLIPIQA" in specs:
        rows += clip_scores(args.clip_weights, items, methods, args.out, multi)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not rows:
        raise UsageError("no fused image matched any pair (check the file stems)")

    with open(args.out / "per_image.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "method", "metric", "value"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "value": repr(float(r["value"]))})
    n_pairs = {d: sum(it.dataset == d for it in items) for d in dict.fromkeys(it.dataset for it in items)}
    n_gt = {d: sum(it.dataset == d and it.gt is not None for it in items) for d in n_pairs}
    summary = report.summarise(rows, n_pairs, n_gt)
    metric_cols = [s for s in specs if any(r["metric"] == s for r in rows)]
    report.write_summary_csv(args.out / "summary.csv", summary, names, metric_cols)
    header = [f"# Evaluation: task {args.task}", "",
              f"Pairs: `{args.pairs}` ({len(items)} pairs: "
              + ", ".join(f"{d} {sum(it.dataset == d for it in items)}" for d in dict.fromkeys(it.dataset for it in items))
              + f"). Colour convention: {args.color}. Values are means over images."]
    if warnings:
        notes.append(f"{len(warnings)} method/image combinations were skipped (see stderr).")
    header += [f"- {n}" for n in notes]
    text = report.write_summary_md(args.out / "summary.md", summary, names, metric_cols, header)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(text.split("\n\nBest in")[0])
    print(f"\nwrote {args.out / 'per_image.csv'}, summary.csv, summary.md"
          + ("" if args.no_compare else f" and {len(items)} compare grids in {args.out / 'compare'}"))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from defusion_jax import compile_cache

    compile_cache.enable()
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
