"""Fuse image pairs: `python -m defusion_jax.fuse --model PATH --task {ivf,mef,mff} --a A --b B --out OUT`.

A and B are two image files, or two folders whose files are paired by name stem (unmatched
names are listed, never guessed). PATH is a training workdir, a checkpoint, a parameter folder,
an official PyTorch checkpoint (.pth/.safetensors) or a folder written by
`python -m defusion_jax.export`. Any size (reflect padding as the official test, tiles for very
large images), PNG/JPEG/BMP/TIFF/.npy, 8- or 16-bit. Existing outputs are kept unless
--overwrite, and every file is written under a temporary name and renamed, so an interrupted
run leaves only complete files and a rerun continues where it stopped. See docs/fusion.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from defusion_jax import allocator

if __name__ == "__main__":  # before jax is imported: the command restarts under tcmalloc (allocator.py)
    allocator.reexec_with_tcmalloc()

import numpy as np  # noqa: E402

from defusion_jax import exported, imageio, inference, paths  # noqa: E402

FORMATS = ("png", "tif", "jpg", "bmp", "npy")
FORMAT_ALIASES = {"tiff": "tif", "jpeg": "jpg"}  # one format, two suffixes


class InputError(ValueError):
    """Bad input the user can fix; reported as one line, exit code 2."""


@dataclass
class Pair:
    name: str
    a: Path
    b: Path
    out: Path | None = None  # the fused image's path


@dataclass
class Summary:
    fused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): outputs exist
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): bad input
    seconds: float = 0.0


# ---- arguments -------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8G, 512M)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def _canonical_format(fmt: str) -> str:
    fmt = fmt.lower().lstrip(".")
    return FORMAT_ALIASES.get(fmt, fmt)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m defusion_jax.fuse", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="workdir, checkpoint, parameter folder, official .pth/.safetensors, or export folder")
    ap.add_argument("--task", required=True, choices=inference.TASKS,
                    help="ivf: infrared (a) + visible (b); mef: under (a) + over (b) exposed; mff: near + far focus")
    ap.add_argument("--a", required=True, help="first image, or folder of them")
    ap.add_argument("--b", required=True, help="second image, or folder of them")
    ap.add_argument("--out", required=True, help="output file (single pair; suffix picks the format) or folder")
    ap.add_argument("--color", nargs="?", const="auto", choices=("auto", "a", "b"),
                    help="IVF only: colour output, Y from the fused image and CbCr from the visible image "
                         "(auto: the more colourful input; default: grey output as the official protocol)")
    ap.add_argument("--format", choices=FORMATS + tuple(FORMAT_ALIASES), help="output format in folder mode (default: png; "
                                                      "tif for TIFF inputs; npy for .npy inputs)")
    ap.add_argument("--bit-depth", default="keep", choices=("keep", "8", "16", "32"),
                    help="output sample depth (default keep: that of the deeper input; 32 = float)")
    ap.add_argument("--save-decomposition", action="store_true",
                    help="also write the common and unique images and their heat-map overlays")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    ap.add_argument("--direction", choices=("q_view2", "q_view1"),
                    help="common-feature direction (default q_view2; an export folder has its own baked in, "
                         "and a different value is an error)")
    ap.add_argument("--bucket", type=int, default=0, metavar="N",
                    help="pad each canvas further up to a multiple of N (e.g. 64, 128) so mixed sizes share "
                         "compiled functions; changes the output slightly (docs/fusion.md); default 0 = exact")
    lim = ap.add_mutually_exclusive_group()
    lim.add_argument("--memory-limit", type=parse_size, metavar="SIZE",
                     help="memory one pass may use, e.g. 4G; larger images are tiled (default: 80%% of "
                          "accelerator memory, or half the RAM on CPU)")
    lim.add_argument("--max-pixels", type=positive_int, metavar="N", help="largest canvas (pixels) one pass may take")
    ap.add_argument("--overlap", type=int, default=inference.DEFAULT_OVERLAP,
                    help=f"tile overlap in pixels (default {inference.DEFAULT_OVERLAP})")
    ap.add_argument("--precision", choices=inference.MATMUL_PRECISIONS,
                    help="matmul precision (default highest: float32 products; high/default: faster passes on "
                         "GPUs/TPUs; bfloat16: bfloat16 operands with float32 sums on any device, ~1.2x faster on "
                         "some CPUs (Zen 4), slower on others; an export folder has its own baked in, and "
                         "a different value is an error)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    return ap


# ---- model -----------------------------------------------------------------------------------
def load_runner(path: str, direction: str = "q_view2", precision: str = "highest"):
    """A runner for any model form; raises InputError with one line."""
    remote = paths.is_url(path)  # a gs:// training workdir: load_model reads it there
    p = path if remote else Path(path)
    if not remote and not p.exists():
        raise InputError(f"model not found: {path}")
    try:
        if not remote and p.is_dir() and exported.is_export_dir(p):
            return inference.ExportedRunner(exported.load(p))
        from defusion_jax.api import load_model

        return inference.ModelRunner(load_model(p), direction, precision)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot load model {path}: {msg}") from None


# ---- pairs -----------------------------------------------------------------------------------
def _images_by_stem(folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """{stem: file} for stems with one image, {stem: 'stem (x.png, x.jpg)'} for the others."""
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and imageio.is_image_file(p):
            by_stem.setdefault(p.stem, []).append(p)
    unique = {s: ps[0] for s, ps in by_stem.items() if len(ps) == 1}
    dup = {s: f"{s} ({', '.join(p.name for p in ps)})" for s, ps in by_stem.items() if len(ps) > 1}
    return unique, dup


def match_folders(a: Path, b: Path) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Pairs by file stem, and (name, reason) for every file that is not paired."""
    if not any(imageio.is_image_file(p) for p in a.iterdir()):
        raise InputError(f"no images in {a} (looked for {', '.join(imageio.IMAGE_SUFFIXES)})")
    if not any(imageio.is_image_file(p) for p in b.iterdir()):
        raise InputError(f"no images in {b} (looked for {', '.join(imageio.IMAGE_SUFFIXES)})")
    ia, dup_a = _images_by_stem(a)
    ib, dup_b = _images_by_stem(b)
    pairs = [Pair(s, ia[s], ib[s]) for s in sorted(set(ia) & set(ib))]
    # a stem that is ambiguous in one folder is listed as that, not also as "only in" the other
    unmatched = [(s, f"only in {a}") for s in sorted(set(ia) - set(ib) - set(dup_b))]
    unmatched += [(s, f"only in {b}") for s in sorted(set(ib) - set(ia) - set(dup_a))]
    unmatched += [(d, f"several files with this stem in {a}") for d in dup_a.values()]
    unmatched += [(d, f"several files with this stem in {b}") for d in dup_b.values()]
    if not pairs:
        raise InputError(f"no file stem in {a} matches one in {b} (e.g. {a}/NAME.png with {b}/NAME.jpg)")
    return pairs, unmatched


# ---- outputs ---------------------------------------------------------------------------------
def _default_format(a: Path) -> str:
    s = a.suffix.lower()
    return "npy" if s == ".npy" else "tif" if s in imageio.TIFF_SUFFIXES else "png"


def output_paths(fused: Path, parts: bool) -> dict[str, Path]:
    """Every file one pair writes: 'fused', plus the decomposition images and their overlays."""
    out = {"fused": fused}
    if parts:
        names = {"common": "common", "unique1": "unique_a", "unique2": "unique_b"}
        for k, n in names.items():
            out[k] = fused.with_name(f"{fused.stem}_{n}{fused.suffix}")
            out[f"heat_{k}"] = fused.with_name(f"{fused.stem}_heat_{n}.png")
    return out


def _depth_for(path: Path, want: int) -> tuple[int, str | None]:
    ok = imageio.WRITE_DEPTHS[path.suffix.lower()]
    if want in ok:
        return want, None
    got = max(d for d in ok if d <= want) if any(d <= want for d in ok) else min(ok)
    if got > want:  # deeper than asked (.npy floats for 8-bit sources): nothing lost, nothing to say
        return got, None
    return got, f"{path.suffix} holds {'/'.join(map(str, ok))}-bit samples: writing {got}-bit instead of {want}-bit"


def fuse_one(runner, pair: Pair, args, max_pixels: int | None, say=None) -> list[str]:
    """Fuse one pair and write its outputs; returns notes (`say` prints the tile plan as soon as
    it is made). Raises InputError for bad input."""
    fused_path = pair.out
    try:
        ia, ib = imageio.read_image(pair.a), imageio.read_image(pair.b)
    except imageio.ImageReadError as e:
        raise InputError(str(e)) from None
    for p, im in ((pair.a, ia), (pair.b, ib)):  # float files may hold any range; the network takes [0, 1]
        try:
            exported.as_unit_float(im.pixels, str(p))
        except ValueError as e:
            raise InputError(str(e)) from None
    if ia.size != ib.size:
        raise InputError(f"size mismatch: {pair.a} is {ia.size[0]}x{ia.size[1]} but {pair.b} is "
                         f"{ib.size[0]}x{ib.size[1]} (HxW); the two images of a pair must be the same size")
    notes = [f"{p.name}: {n}" for p, im in ((pair.a, ia), (pair.b, ib)) for n in im.notes]
    parts = args.save_decomposition

    def tile_bar(plan):  # a tile of the official network can take minutes on a CPU: say what runs
        from tqdm import tqdm

        if say is not None:
            say(f"note: {pair.name}: {plan.count} tiles of {plan.tile[0]}x{plan.tile[1]}")
        return tqdm(total=plan.count, desc=f"{pair.name}: tiles", unit="tile", disable=args.quiet,
                    leave=False, file=sys.stderr, dynamic_ncols=True)

    res = inference.fuse_arrays(runner, ia.pixels, ib.pixels, args.task, parts=parts, bucket=args.bucket,
                                max_pixels=max_pixels, overlap=args.overlap, progress=tile_bar)
    for k, v in {"fused": res.fused, **res.parts}.items():  # never cast NaN to black and call it done
        if not np.isfinite(v).all():
            raise ValueError(f"the model's {k} output has {v.size - int(np.isfinite(v).sum())} NaN or "
                             "infinite values; nothing written")
    fused = np.clip(res.fused, 0.0, 1.0)
    if args.color:
        src = args.color
        if src == "auto":
            src = "a" if inference.chroma_energy(ia.pixels) > inference.chroma_energy(ib.pixels) else "b"
        visible = (ia if src == "a" else ib).pixels
        if inference.chroma_energy(visible) == 0.0:
            notes.append(f"{pair.name}: --color: the visible image ({src}) is grey, so the output is grey")
        fused = inference.recolor(fused, visible)
    want = max(ia.bit_depth, ib.bit_depth) if args.bit_depth == "keep" else int(args.bit_depth)
    depth, note = _depth_for(fused_path, want)
    if note:
        notes.append(f"{pair.name}: {note}")
    paths = output_paths(fused_path, parts)
    if parts:
        for k in inference.PARTS:  # raw in .npy, clipped in image files
            v = res.parts[k] if fused_path.suffix.lower() == ".npy" else np.clip(res.parts[k], 0, 1)
            imageio.write_image(paths[k], v, depth)
        for k, v in inference.heat_maps(res.parts, ia.pixels, ib.pixels).items():
            imageio.write_image(paths[f"heat_{k}"], v, 8)
    imageio.write_image(fused_path, fused, depth)  # last: its presence marks the pair as done
    return notes


# ---- main ------------------------------------------------------------------------------------
def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _same(p: Path, q: Path) -> bool:
    """One file or folder under two names (symlinks, `..`, hard links)."""
    try:
        return p.resolve() == q.resolve() or (p.exists() and q.exists() and p.samefile(q))
    except OSError:
        return False


def _check_not_inputs(pairs: list[Pair], a: Path, b: Path, out: Path, folder_mode: bool, parts: bool) -> None:
    """Outputs are written over existing files with --overwrite and existing outputs count as done
    without it, so an output that is an input would destroy it or silently skip the pair."""
    if folder_mode:
        for name, src in (("--a", a), ("--b", b)):
            if _same(out, src):
                raise InputError(f"--out {out} is the {name} folder; the outputs would overwrite or be "
                                 "mistaken for the inputs: choose another folder")
        owner: dict[Path, tuple[str, str]] = {}  # pair X's part X_common.png is pair X_common's fused image
        for pair in pairs:
            for kind, path in output_paths(pair.out, parts).items():
                if path in owner:
                    (other, other_kind) = owner[path]
                    raise InputError(f"{path.name} would be both the {other_kind} output of pair {other!r} and "
                                     f"the {kind} output of pair {pair.name!r}; rename one of them or fuse "
                                     "them into separate --out folders")
                owner[path] = (pair.name, kind)
        return
    for pair in pairs:
        for path in output_paths(pair.out, parts).values():
            for name, src in (("--a", pair.a), ("--b", pair.b)):
                if _same(path, src):
                    raise InputError(f"output {path} is the {name} input; choose another --out")


def _plan(args) -> tuple[list[Pair], list[tuple[str, str]], Path, bool]:
    """(pairs with their output paths, unmatched, output folder, folder mode)."""
    pairs, unmatched, out_dir, folder_mode = _plan_paths(args)
    _check_not_inputs(pairs, Path(args.a), Path(args.b), out_dir, folder_mode, args.save_decomposition)
    return pairs, unmatched, out_dir, folder_mode


def _plan_paths(args) -> tuple[list[Pair], list[tuple[str, str]], Path, bool]:
    a, b, out = Path(args.a), Path(args.b), Path(args.out)
    for p in (a, b):
        if not p.exists():
            raise InputError(f"no such file or folder: {p}")
    if a.is_dir() != b.is_dir():
        raise InputError(f"--a and --b must both be files or both be folders ({a} is a "
                         f"{'folder' if a.is_dir() else 'file'}, {b} is a {'folder' if b.is_dir() else 'file'})")
    if a.is_dir():
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file; with folders of images it must be a folder")
        pairs, unmatched = match_folders(a, b)
        for p in pairs:
            p.out = out / f"{p.name}.{args.format or _default_format(p.a)}"
        return pairs, unmatched, out, True
    for p in (a, b):
        if not imageio.is_image_file(p):
            raise InputError(f"{p}: unsupported file type {p.suffix!r} (expected one of {', '.join(imageio.IMAGE_SUFFIXES)})")
    # an existing folder, or a path written with a trailing slash, is a folder whatever its name
    as_folder = out.is_dir() or str(args.out).endswith(("/", os.sep))
    if out.suffix.lower() in imageio.WRITE_DEPTHS and not as_folder:
        if args.format and _canonical_format(out.suffix) != _canonical_format(args.format):
            raise InputError(f"--format {args.format} contradicts the suffix of --out {out}")
        return [Pair(out.stem, a, b, out)], [], out.parent, False
    if out.suffix and not as_folder:
        raise InputError(f"--out {out}: cannot write {out.suffix!r} files (use one of {', '.join(imageio.WRITE_DEPTHS)})")
    return [Pair(a.stem, a, b, out / f"{a.stem}.{args.format or _default_format(a)}")], [], out, False


NO_PARTS = "--save-decomposition needs a checkpoint; an exported function gives the fused image only"


def check_export_options(model: str, *, direction: str | None = None, precision: str | None = None,
                         parts: bool = False) -> None:
    """An export folder has its direction and precision baked in, and no decomposition: options
    that ask for something else are errors (InputError), not silently ignored. `fuse` and
    `evaluate --model` check them before loading anything."""
    path = Path(model)
    if paths.is_url(model) or not path.is_dir() or not exported.is_export_dir(path):
        return
    if parts:
        raise InputError(NO_PARTS)
    try:
        manifest = json.loads((path / exported.MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model {path}: unreadable manifest ({e})") from None
    for opt, key, given in (("--direction", "direction", direction),
                            ("--precision", "matmul_precision", precision)):
        baked = manifest.get(key)
        if given is not None and baked is not None and given != baked:
            raise InputError(f"{opt} {given}: the export {path} was made with {key} {baked}, which is fixed "
                             f"in it; drop {opt} or re-export with it")


def _probe_output_folder(out_dir: Path) -> None:
    """Create the output folder and write (and delete) a file there, so an unwritable folder is
    reported once, before any pair is computed."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-probe{imageio.TEMP_MARK}", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write to output folder {out_dir}: {e.strerror or type(e).__name__}") from None


def run(args, runner=None) -> int:
    """The CLI body; `runner` (an inference runner) replaces --model when given (tests, notebooks)."""
    if args.bucket < 0 or args.bucket % 16:
        return _fail(f"--bucket must be 0 or a multiple of 16, got {args.bucket}")
    if args.overlap < 0 or args.overlap % 16:
        return _fail(f"--overlap must be a non-negative multiple of 16, got {args.overlap}")
    if args.color and args.task != "ivf":
        return _fail("--color is for IVF; MEF and MFF outputs are colour already")
    try:
        pairs, unmatched, out_dir, folder_mode = _plan(args)
    except InputError as e:
        return _fail(str(e))
    try:  # everything that can fail without the model fails before it loads
        check_export_options(args.model, direction=args.direction, precision=args.precision,
                             parts=args.save_decomposition)
        _probe_output_folder(out_dir)
    except InputError as e:
        return _fail(str(e))
    summary = Summary()
    todo = []
    for pair in pairs:
        done = all(p.exists() for p in output_paths(pair.out, args.save_decomposition).values())
        if done and not args.overwrite:
            summary.skipped.append((pair.name, f"{pair.out} exists (--overwrite replaces it)"))
        else:
            todo.append(pair)
    if runner is None and todo:  # a rerun with nothing left to do does not load the model
        try:
            runner = load_runner(args.model, args.direction or "q_view2", args.precision or "highest")
        except InputError as e:
            return _fail(str(e))
    if runner is not None and args.save_decomposition and not runner.has_parts:
        return _fail(NO_PARTS)
    patch = runner.patch if runner is not None else 16
    if args.max_pixels is not None:
        max_pixels = args.max_pixels
    else:
        limit = args.memory_limit or inference.default_memory_limit()
        max_pixels = inference.max_pixels_for(limit, args.save_decomposition, patch)
    imageio.remove_stale_temporaries(out_dir)

    from tqdm import tqdm

    say = (lambda m: None) if args.quiet else (lambda m: tqdm.write(m, file=sys.stderr))
    bar = tqdm(todo, desc="fusing", unit="pair", disable=args.quiet or not folder_mode, file=sys.stderr,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for pair in bar:
            bar.set_postfix_str(pair.name, refresh=False)
            try:
                for note in fuse_one(runner, pair, args, max_pixels, say):
                    say(f"note: {note}")
                summary.fused += 1
            except InputError as e:
                summary.failed.append((pair.name, str(e)))
                if not folder_mode:
                    return _fail(str(e))
                say(f"skipped {pair.name}: {e}")
            except Exception as e:  # an unwritable output, a too-small memory limit, out of memory
                if not isinstance(e, (ValueError, OSError)) and "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                if "RESOURCE_EXHAUSTED" in msg:
                    msg = f"out of memory ({msg[:120]}); lower --memory-limit so large images are tiled"
                summary.failed.append((pair.name, msg))
                if not folder_mode:
                    return _fail(msg)
                say(f"skipped {pair.name}: {msg}")
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted after {summary.fused} fused pair(s); finished outputs are complete, "
              "rerun the same command to continue", file=sys.stderr)
        return 130
    finally:
        summary.seconds = time.perf_counter() - start
    bar.close()
    _report(summary, unmatched, runner, folder_mode, out_dir if folder_mode else pairs[0].out)
    return 2 if summary.failed else 0


def _report(s: Summary, unmatched, runner, folder_mode: bool, where: Path) -> None:
    rate = s.fused / s.seconds if s.seconds > 0 else 0.0
    speed = f"{rate:.3g} images/s" + (f", {1 / rate:.1f} s/pair" if 0 < rate < 1 else "")
    compiled = len(runner.shapes) if runner is not None else 0
    if not folder_mode:
        if s.fused:
            print(f"fused -> {where} ({s.seconds:.1f} s)")
        for name, reason in s.skipped:
            print(f"skipped {name}: {reason}")
        return
    print(f"fused {s.fused} pair(s) in {s.seconds:.1f} s ({speed}, {compiled} compiled shape(s)) "
          f"-> {where}; skipped {len(s.skipped) + len(s.failed)} "
          f"({len(s.skipped)} already done, {len(s.failed)} failed); {len(unmatched)} unmatched")
    for name, reason in s.failed:
        print(f"  failed  {name}: {reason}")
    for name, reason in s.skipped:
        print(f"  skipped {name}: {reason}")
    for name, reason in unmatched:
        print(f"  unmatched {name}: {reason}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from defusion_jax import compile_cache

    compile_cache.enable()  # one compile per image size, kept
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; finished outputs are complete, rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
