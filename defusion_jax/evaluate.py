"""Score fusion results the way the field does and write paper-style reports.

    python -m defusion_jax.evaluate --task {ivf,mef,mff} --pairs DIR --out OUT
        [--fused NAME=DIR ...] [--baseline NAME ...] [--model PATH] [--gt DIR]
        [--metrics LIST] [--color {gray,per-channel}] [--clip-weights PATH] [--workers N] [--no-compare]

DIR is a dataset folder holding the two source folders (ivf: ir/vi, mef: under/over, mff: A/B),
or a folder of such dataset folders (one level), or the data root holding <task>/ folders.
Fused images are matched to pairs by file stem, in FUSED/<dataset>/ or directly in FUSED/
(case-insensitively when no stem matches exactly).
`--fused NAME` without '=' is the same as `--baseline NAME`. Writes OUT/per_image.csv,
OUT/summary.csv, OUT/summary.md, OUT/compare/*.png and the fused images of baselines and of
--model under OUT/fused/<method>/<dataset>/.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defusion_jax.imageio import atomic_path, atomic_write_bytes
from defusion_jax.inference import MATMUL_PRECISIONS

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
def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def pick_image(folder: Path, stem: str, warnings: list[str] | None = None, ignore_case: bool = False) -> Path | None:
    """The image for `stem` in `folder`; when several files share the stem (X.png and X.jpg), the
    first by name, with a warning naming the one taken."""
    from defusion_jax.metrics.io import find_images

    found = find_images(folder, stem, ignore_case=ignore_case)
    if len(found) > 1:
        msg = (f"{folder}: {', '.join(p.name for p in found)} share the stem {stem!r}; using {found[0].name}")
        if warnings is None:
            print(f"warning: {msg}", file=sys.stderr)
        else:
            warnings.append(msg)
    return found[0] if found else None


def discover(pairs: Path, task: str, gt: Path | None) -> list[Item]:
    from defusion_jax.metrics.io import list_stems

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
            g = pick_image(gt_dir, stem) if gt_dir is not None else None
            items.append(Item(d.name, stem, str(pick_image(d / ra, stem)), str(pick_image(d / rb, stem)),
                              str(g) if g else None))
    if not items:
        raise UsageError(f"--pairs {pairs}: no image pairs found")
    return items


def fused_path(folder: str, item: Item, warnings: list[str] | None = None) -> Path | None:
    """The fused image for `item` in FOLDER/<dataset>/ or FOLDER/, by exact stem first, then by stem
    ignoring case (tools that upper-case names)."""
    dirs = [d for d in (Path(folder) / item.dataset, Path(folder)) if d.is_dir()]
    for ignore_case in (False, True):
        for d in dirs:
            p = pick_image(d, item.stem, warnings, ignore_case=ignore_case)
            if p is not None:
                return p
    return None


# ------------------------------------------------------------------------------------- scoring
def _save_png(path: Path, image) -> None:
    """An array or a PIL image, written atomically (`imageio.atomic_path`), so a PNG that exists is complete."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _file_sig(path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _try_read(path, what: str, warnings: list[str]) -> np.ndarray | None:
    from defusion_jax.metrics.io import _read_image

    try:
        return _read_image(path)
    except Exception as exc:  # noqa: BLE001 - a corrupt or unknown file is the user's data, not our bug
        warnings.append(f"{what}: cannot read {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        return None


def _size(x: np.ndarray) -> str:
    return f"{x.shape[1]}x{x.shape[0]}"


def read_sources(item: Item, warnings: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Both sources of a pair, or None (with a warning) when one is unreadable or their sizes differ."""
    name = f"{item.dataset}/{item.stem}"
    a = _try_read(item.a, f"{name}: source", warnings)
    b = _try_read(item.b, f"{name}: source", warnings)
    if a is None or b is None:
        return None
    if a.shape[:2] != b.shape[:2]:
        warnings.append(f"{name}: sources differ in size ({_size(a)} vs {_size(b)}); pair skipped")
        return None
    return a, b


def score_item(job: dict) -> dict:
    """Worker: fuse with baselines, score every method on one pair, draw its compare grid.

    A bad source skips the pair ("pair_skipped"), a bad GT only the GT metrics ("gt_ok" False), a bad
    fused image only that method ("methods_skipped"); each with a warning.
    """
    import cv2

    from defusion_jax import baselines, report
    from defusion_jax.metrics import score

    cv2.setNumThreads(1)
    item: Item = job["item"]
    out = Path(job["out"])
    name = f"{item.dataset}/{item.stem}"
    rows, warnings, tiles = [], [], []
    result = {"rows": rows, "warnings": warnings, "pair_skipped": False, "gt_ok": False, "methods_skipped": 0}
    src = read_sources(item, warnings)
    if src is None:
        result["pair_skipped"] = True
        return result
    a, b = src
    gt = _try_read(item.gt, f"{name}: GT", warnings) if item.gt else None
    if gt is not None and gt.shape[:2] != a.shape[:2]:
        warnings.append(f"{name}: GT is {_size(gt)}, sources are {_size(a)}; GT metrics skipped for this pair")
        gt = None
    result["gt_ok"] = gt is not None
    for m in job["methods"]:
        if m.kind == "baseline":
            f = baselines.run_baseline(m.source, a, b)
            _save_png(out / "fused" / m.name / item.dataset / f"{item.stem}.png", f)
        else:
            p = fused_path(m.source, item, warnings)
            f = None if p is None else _try_read(p, f"{m.name}: {name}", warnings)
            if f is None:
                if p is None:
                    warnings.append(f"{m.name}: no fused image for {name}")
                result["methods_skipped"] += 1
                continue
        if f.shape[:2] != a.shape[:2]:
            warnings.append(f"{m.name}: {name} is {_size(f)}, sources are {_size(a)}; skipped")
            result["methods_skipped"] += 1
            continue
        tiles.append((m.name, f))
        for k, v in score(a, b, f, job["specs"], color=job["color"], gt=gt).items():
            rows.append({"dataset": item.dataset, "image": item.image_id(job["multi"]), "method": m.name,
                         "metric": k, "value": v})
    if job["compare"] and tiles:
        ra, rb = ROLES[job["task"]]
        head = [(ra, a), (rb, b)] + ([("GT", gt)] if gt is not None else [])
        fname = f"{item.dataset}__{item.stem}.png" if job["multi"] else f"{item.stem}.png"
        _save_png(out / "compare" / fname, report.compare_grid(head + tiles))
    return result


MARKER = "fused_by.json"


def model_fingerprint(model_path: str, meta: dict | None) -> dict:
    """What identifies the network that made a folder of fused PNGs: a checkpoint file by resolved path,
    size and mtime; a workdir by the checkpoint step and path `load_model` reports (a converted folder,
    which has no step, by its files' sizes and mtimes)."""
    p = Path(model_path).resolve()
    if p.is_file():
        return {"path": str(p), "file": _file_sig(p)}
    meta = meta or {}
    fp = {"path": str(p), "step": meta.get("step"), "source": str(meta.get("source", ""))}
    if fp["step"] is None:
        fp["files"] = {c.name: _file_sig(c) for c in sorted(p.iterdir()) if c.is_file()}
    return fp


def fuse_with_model(model_path: str, items: list[Item], task: str, out: Path, name: str,
                    precision: str | None = None) -> tuple[Path, dict[Item, str]]:
    """Fuse every pair with the DeFusion++ network; the PNGs are then scored like any fused folder.

    A rerun into the same OUT reuses a pair's PNG when OUT/fused/<name>/fused_by.json says it was
    made by the same model, for the same task and precision (`fuse --precision`; an export folder's
    own when None), from the same source files (size and mtime); otherwise
    the pair is fused again (~30 s a pair on CPU). Returns the folder and the pairs that could not be
    fused (unreadable or mismatched sources), each with its warning; those pairs are skipped.
    """
    try:
        from defusion_jax import fuse, inference
    except ImportError as exc:
        raise UsageError(f"--model needs the DeFusion++ network code (defusion_jax.fuse), which failed to import: {exc}")
    from tqdm import tqdm

    try:
        fuse.check_export_options(model_path, precision=precision)
    except fuse.InputError as exc:
        raise UsageError(str(exc))
    precision = None if precision == "highest" else precision  # (None: highest, or an export's own)

    def load():  # any form `fuse --model` takes: checkpoint, workdir, converted or export folder
        try:
            return fuse.load_runner(model_path, precision=precision or "highest")
        except fuse.InputError as exc:
            raise UsageError(f"--model: {exc}")

    # A checkpoint file is identified without loading it, so a rerun that reuses every PNG skips the load.
    runner = None if Path(model_path).is_file() else load()
    meta = getattr(getattr(runner, "model", None), "meta", None)  # an export folder has none
    fp = model_fingerprint(model_path, meta)
    root = out / "fused" / name
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    same = {"model": fp, "task": task, "precision": precision}
    if not isinstance(marker, dict) or any(marker.get(k) != v for k, v in same.items()):
        marker = {**same, "pairs": {}}  # PNGs already there are another model's or precision's: not reused
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / MARKER, marker)

    bad: dict[Item, str] = {}
    todo = []
    for it in items:
        png = root / it.dataset / f"{it.stem}.png"
        key = f"{it.dataset}/{it.stem}"
        try:
            sig = {"a": _file_sig(it.a), "b": _file_sig(it.b)}
        except OSError:
            sig = None
        if sig is not None and marker["pairs"].get(key) == sig and png.is_file():
            continue
        todo.append((it, png, key, sig))
    reused = len(items) - len(todo)
    if reused:
        print(f"note: {name}: reused {reused} of {_plural(len(items), 'fused image')} in {root} (made by the same "
              f"model from the same sources); fusing {len(todo)}", file=sys.stderr)
    for it, png, key, sig in tqdm(todo, desc=f"fusing with {name}", unit="pair", disable=not todo):
        warnings: list[str] = []
        src = read_sources(it, warnings)
        if src is None:
            bad[it] = "; ".join(warnings)
            continue
        if runner is None:  # at the first readable pair: a rerun left with unreadable pairs only loads nothing
            runner = load()
        f = inference.fuse_pair(runner, src[0], src[1], task)  # stored uint8/uint16/grey: scaled as by the API
        _save_png(png, np.clip(np.rint(np.asarray(f) * 255.0), 0, 255).astype(np.uint8))
        marker["pairs"][key] = sig
        _write_json(root / MARKER, marker)
    return root, bad


def load_clip(weights: str):
    """The CLIPIQA scorer, built before any work so bad weights or a missing open_clip fail at once."""
    from defusion_jax.metrics.clipiqa import ClipIQA

    try:
        return ClipIQA(weights)
    except Exception as exc:  # noqa: BLE001 - missing package or unreadable weights: a user-facing problem
        raise UsageError(f"CLIPIQA: cannot load {weights}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def clip_scores(scorer, items, methods, out: Path, multi: bool, warnings: list[str]) -> list[dict]:
    from defusion_jax.metrics import _rgb01

    rows = []
    for it in items:
        for m in methods:
            p = (out / "fused" / m.name / it.dataset / f"{it.stem}.png") if m.kind == "baseline" else fused_path(m.source, it, warnings)
            if p is None or not Path(p).exists():
                continue
            f = _try_read(p, f"{m.name}: {it.dataset}/{it.stem} (CLIPIQA)", warnings)
            if f is None:
                continue
            rows.append({"dataset": it.dataset, "image": it.image_id(multi), "method": m.name,
                         "metric": "CLIPIQA", "value": float(scorer(_rgb01(f)))})
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
    p.add_argument("--model", help="DeFusion++ model to fuse with on the fly (method name DeFusion++): a checkpoint, workdir, converted folder or export folder")
    p.add_argument("--precision", choices=MATMUL_PRECISIONS,
                   help="matmul precision of the --model fusion, as `fuse --precision` (default highest; an export "
                        "folder has its own)")
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

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
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
        raise UsageError(f"no metric left to compute ({'; '.join(n.rstrip('.') for n in notes)})"
                         if notes else "no metric left to compute")
    multi = len({it.dataset for it in items}) > 1
    n_all = len(items)

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
    if args.model and not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or folder")
    if args.precision and not args.model:
        raise UsageError("--precision is the precision of --model fusion; there is no --model")
    names = [m.name for m in methods] + (["DeFusion++"] if args.model else [])
    if not names:
        raise UsageError("nothing to evaluate: give --fused NAME=DIR, --baseline NAME or --model PATH")
    if len(set(names)) != len(names):
        raise UsageError(f"method names must be unique, got {names}")
    clip = load_clip(args.clip_weights) if "CLIPIQA" in specs else None

    warnings: list[str] = []
    skipped_pairs: list[str] = []
    if args.model:
        root, bad = fuse_with_model(args.model, items, args.task, args.out, "DeFusion++", args.precision)
        methods.append(Method("DeFusion++", "dir", str(root)))
        warnings += bad.values()
        skipped_pairs += [f"{it.dataset}/{it.stem}" for it in bad]
        items = [it for it in items if it not in bad]

    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [{"item": it, "methods": methods, "specs": [s for s in specs if s != "CLIPIQA"], "color": args.color,
             "out": str(args.out), "multi": multi, "task": args.task, "compare": not args.no_compare} for it in items]
    rows: list[dict] = []
    scored: list[Item] = []
    gt_ok: set[Item] = set()
    methods_skipped = 0
    workers = max(1, min(args.workers, len(jobs)))
    bar = tqdm(total=len(jobs), desc="scoring", unit="pair")
    results = _score_all(jobs, workers)
    done = 0
    interrupted = False
    try:
        for job, r in zip(jobs, results):
            rows += r["rows"]
            warnings += r["warnings"]
            methods_skipped += r["methods_skipped"]
            if r["pair_skipped"]:
                skipped_pairs.append(f"{job['item'].dataset}/{job['item'].stem}")
            else:
                scored.append(job["item"])
                if r["gt_ok"]:
                    gt_ok.add(job["item"])
            done += 1
            bar.update()
    except KeyboardInterrupt:
        # Ctrl-C: keep what is scored; closing the generator terminates the pool.
        interrupted = True
    finally:
        results.close()
        bar.close()
    if interrupted:
        msg = f"interrupted after {done} of {_plural(len(jobs), 'pair')}"
        if not scored or not rows:
            print(f"{msg}; nothing written", file=sys.stderr)
            return 130
        notes.append(f"{msg[0].upper()}{msg[1:]} (Ctrl-C): the tables cover the {_plural(len(scored), 'pair')} "
                     "scored before it" + ("; CLIPIQA was not computed." if clip is not None else "."))
    elif clip is not None:
        try:
            rows += clip_scores(clip, scored, methods, args.out, multi, warnings)
        except KeyboardInterrupt:
            interrupted = True
            msg = f"interrupted while computing CLIPIQA, after scoring all {_plural(len(jobs), 'pair')}"
            notes.append(f"{msg[0].upper()}{msg[1:]} (Ctrl-C): CLIPIQA was not computed.")
    for w in dict.fromkeys(warnings):  # CLIPIQA looks the same files up again
        print(f"warning: {w}", file=sys.stderr)
    if not scored:
        raise UsageError(f"none of the {_plural(n_all, 'pair')} could be read (see the warnings)")
    if not rows:
        raise UsageError("no fused image matched any pair (check the file stems)")

    with atomic_path(args.out / "per_image.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "method", "metric", "value"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "value": repr(float(r["value"]))})
    datasets = list(dict.fromkeys(it.dataset for it in items))
    n_pairs = {d: sum(it.dataset == d for it in scored) for d in datasets}
    n_gt = {d: sum(it.dataset == d for it in gt_ok) for d in datasets}
    summary = report.summarise(rows, n_pairs, n_gt)
    metric_cols = [s for s in specs if any(r["metric"] == s for r in rows)]
    report.write_summary_csv(args.out / "summary.csv", summary, names, metric_cols)
    header = [f"# Evaluation: task {args.task}", "",
              f"Pairs: `{args.pairs}` ({_plural(n_all, 'pair')}"
              + (f", {len(scored)} scored" if len(scored) != n_all else "") + ": "
              + ", ".join(f"{d} {n_pairs[d]}" for d in datasets)
              + f"). Colour convention: {args.color}. Values are means over images."]
    if skipped_pairs:
        notes.append(f"{_plural(len(skipped_pairs), 'pair')} skipped (unreadable sources or sources of different "
                     f"sizes; see stderr): {', '.join(skipped_pairs)}.")
    n_gt_bad = sum(1 for it in scored if it.gt and it not in gt_ok)
    if n_gt_bad and any(parse_metric(s)[0].kind == "gt" for s in metric_cols):
        notes.append(f"GT unusable (unreadable or of another size) for {_plural(n_gt_bad, 'pair')}; "
                     "their GT metrics were not computed.")
    if methods_skipped:
        notes.append(f"{methods_skipped} method/image combination{'s were' if methods_skipped != 1 else ' was'} "
                     "skipped: missing, unreadable or wrongly sized fused images (see stderr).")
    header += [f"- {n}" for n in notes]
    text = report.write_summary_md(args.out / "summary.md", summary, names, metric_cols, header)
    if interrupted:
        print(f"{msg}; wrote what was scored to {args.out} (per_image.csv, summary.csv, summary.md)", file=sys.stderr)
        return 130
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if report.coverage_notes(summary, names, metric_cols):
        print("note: some means cover fewer images than others (shown as 'mean (n/N)', not ranked); "
              "see summary.md", file=sys.stderr)
    print(text.split("\n\nBest in")[0])
    print(f"\nwrote {args.out / 'per_image.csv'}, summary.csv, summary.md"
          + ("" if args.no_compare else f" and compare grids in {args.out / 'compare'}"))
    return 0


def _ignore_sigint() -> None:
    # Pool workers share the terminal's process group: Ctrl-C reaches them too. The parent alone
    # handles it (and terminates them), so they print no tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _score_all(jobs: list[dict], workers: int):
    """score_item over the jobs, in order, in this process or a spawn pool (terminated on close)."""
    if workers == 1:
        yield from map(score_item, jobs)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_ignore_sigint) as pool:
        yield from pool.imap(score_item, jobs)


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
    except KeyboardInterrupt:  # before scoring (fusing with --model): no tables yet
        print("interrupted before scoring; no tables written (fused images already written are reused "
              "by a rerun into the same --out)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
