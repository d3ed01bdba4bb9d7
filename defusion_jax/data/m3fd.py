"""M3FD detection data (paper Sec. 4.4.1): registered IR/visible pairs with VOC XML boxes, and a
generated stand-in with the same record format for smoke runs and tests.

Layout of the public release (`M3FD_Detection`, TarDAL: github.com/JinyuanLiu-CV/TarDAL):

    ROOT/Ir/NAME.png           infrared (grey)
    ROOT/Vis/NAME.png          visible (RGB), registered to the infrared image
    ROOT/Annotation/NAME.xml   VOC XML: <size>, <object><name>People</name><bndbox>xmin ymin xmax ymax

4,200 pairs (NAME = 00000 ... 04199), mostly 1024x768, a few 480x360 (same 4:3 aspect); six classes
People, Car, Bus, Lamp, Motorcycle, Truck. The paper's 8:1:1 split (from CDDFuse) was never
published, so `split_names` makes one deterministically: the sorted names shuffled by
numpy's default_rng(SPLIT_SEED = 0), then the first 80% train, next 10% val, last 10% test. A split
file (`--config.data.split_file`) overrides it: a JSON {"train": [...], "val": [...], "test": [...]}
of names, or a folder with train.txt / val.txt / test.txt (one name per line).

Boxes: VOC pixel indices are 1-based; like detectron2's VOC loader we subtract 1 from xmin and ymin
and keep xmax, ymax, giving continuous (x1, y1, x2, y2) coordinates. Training samples are resized
(both images and boxes) to one fixed size and padded to `max_boxes` ground-truth rows with a
`valid` flag, so every batch has the same shapes.
"""

from __future__ import annotations

import functools
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from absl import logging

from defusion_jax.data.sources import SKIPPED, DataError, read_image

CLASSES = ("People", "Car", "Bus", "Lamp", "Motorcycle", "Truck")  # the Table 4 column order
SYNTHETIC_CLASSES = ("disc", "block", "ring")
SPLIT_SEED = 0
SPLIT_RATIOS = (8, 1, 1)
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def layout_message(root) -> str:
    """One line: what is missing and the layout we expect."""
    return (f"M3FD not found at {str(root)!r}: expected {root}/Ir/NAME.png (infrared), {root}/Vis/NAME.png "
            f"(visible) and {root}/Annotation/NAME.xml (VOC boxes; classes {', '.join(CLASSES)}), i.e. the "
            "unzipped M3FD_Detection release of TarDAL (github.com/JinyuanLiu-CV/TarDAL); point "
            "--config.data.root at it, or run the generated-data smoke config (configs/detect_m3fd.py:smoke)")


@dataclass
class Annotation:
    boxes: np.ndarray  # (n, 4) float32, x1 y1 x2 y2 in original pixels
    classes: np.ndarray  # (n,) int32 indices into the class list
    width: int
    height: int


def parse_voc(path, class_names: Sequence[str] = CLASSES) -> Annotation:
    """Read one VOC XML file. Class names match case-insensitively; objects of other classes and
    boxes without area are left out (counted in the skip tally)."""
    lookup = {c.lower(): i for i, c in enumerate(class_names)}
    root = ET.parse(path).getroot()
    size = root.find("size")
    width = int(float(size.findtext("width", "0"))) if size is not None else 0
    height = int(float(size.findtext("height", "0"))) if size is not None else 0
    boxes, classes = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if name.lower() not in lookup or bb is None:
            SKIPPED.skip(f"{path}:{name}", f"object of unknown class {name!r} (known: {list(class_names)})")
            continue
        x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        x1, y1 = x1 - 1.0, y1 - 1.0  # 1-based VOC indices -> continuous coordinates (detectron2)
        if x2 <= x1 or y2 <= y1:
            SKIPPED.skip(f"{path}:{x1},{y1},{x2},{y2}", "empty box")
            continue
        boxes.append([x1, y1, x2, y2])
        classes.append(lookup[name.lower()])
    return Annotation(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int32), width, height)


def _stems(folder: Path, exts) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in exts}


def index_m3fd(root) -> dict[str, tuple[Path, Path, Path]]:
    """{NAME: (ir, vis, xml)} for every name present in all three folders (others warned about)."""
    root = Path(os.path.expanduser(str(root)))
    dirs = [root / "Ir", root / "Vis", root / "Annotation"]
    if not all(d.is_dir() for d in dirs):
        raise DataError(layout_message(root))
    ir, vi, xml = _stems(dirs[0], IMAGE_EXTS), _stems(dirs[1], IMAGE_EXTS), _stems(dirs[2], (".xml",))
    names = sorted(set(ir) & set(vi) & set(xml))
    incomplete = sorted((set(ir) | set(vi) | set(xml)) - set(names))
    if incomplete:
        logging.warning("M3FD %s: %d names lack one of Ir/Vis/Annotation and are left out, e.g. %s", root,
                        len(incomplete), incomplete[:5])
    if not names:
        raise DataError(layout_message(root) + " (the folders exist but hold no complete IR/Vis/XML triple)")
    return {n: (ir[n], vi[n], xml[n]) for n in names}


def split_names(names: Sequence[str], split: str, seed: int = SPLIT_SEED, ratios: Sequence[int] = SPLIT_RATIOS,
                split_file: str | None = None) -> list[str]:
    """The names of `split` ('train', 'val', 'test', or 'all'); see the module docstring."""
    if split == "all":
        return sorted(names)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS} or 'all'")
    if split_file:
        chosen = _read_split_file(split_file, split)
        missing = sorted(set(chosen) - set(names))
        if missing:
            raise DataError(f"split file {split_file}: {len(missing)} {split} names are not in the data set, "
                            f"e.g. {missing[:5]}")
        return chosen
    order = [sorted(names)[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n = len(order)
    total = float(sum(ratios))
    a = int(round(n * ratios[0] / total))
    b = a + int(round(n * ratios[1] / total))
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}[split]


def _read_split_file(path: str, split: str) -> list[str]:
    p = Path(os.path.expanduser(path))
    try:
        if p.is_dir():
            lines = (p / f"{split}.txt").read_text().split()
            return [Path(x).stem for x in lines]
        data = json.loads(p.read_text())
        return [Path(x).stem for x in data[split]]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"split file {path}: cannot read the {split!r} list ({type(e).__name__}: {e}); expected "
                        "a JSON {\"train\": [...], \"val\": [...], \"test\": [...]} or a folder with "
                        "train.txt / val.txt / test.txt") from None


# ---- sources: record -> raw sample {'ir', 'vi' (H, W, 3) float32, 'boxes', 'classes', 'name'} ------
class M3FDSource:
    """Random-access M3FD pairs of one split; `load` decodes in the grain workers."""

    def __init__(self, root, split: str = "train", class_names: Sequence[str] = CLASSES, seed: int = SPLIT_SEED,
                 split_file: str | None = None, limit: int = 0):
        self.files = index_m3fd(root)
        self.names = split_names(list(self.files), split, seed, split_file=split_file)
        if limit:
            self.names = self.names[:limit]
        if not self.names:
            raise DataError(f"M3FD {root}: the {split!r} split is empty")
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> str:
        return self.names[i]

    def load(self, name: str) -> dict | None:
        ir_path, vi_path, xml_path = self.files[name]
        ir = read_image(ir_path, 16)
        vi = read_image(vi_path, 16) if ir is not None else None
        if ir is None or vi is None:
            return None
        try:
            ann = parse_voc(xml_path, self.class_names)
        except (ET.ParseError, ValueError, TypeError) as e:
            SKIPPED.skip(str(xml_path), f"unreadable annotation ({type(e).__name__}: {e})")
            return None
        if ir.shape != vi.shape:  # registered pairs should agree; boxes follow the visible image
            ir = cv2.resize(ir, (vi.shape[1], vi.shape[0]), interpolation=cv2.INTER_LINEAR)
        return {"ir": ir, "vi": vi, "boxes": ann.boxes, "classes": ann.classes, "name": name}


def synthetic_pair(seed: int, size: Sequence[int] = (128, 128), num_classes: int = 3,
                   max_objects: int = 4) -> dict:
    """One generated IR/visible pair with boxes (deterministic in `seed`).

    Objects of class 0 are discs, 1 filled blocks, 2 rings (hollow squares); in the visible image
    each class has its own colour (red, green, blue), in the infrared image its own brightness.
    A quarter of the objects is only in the IR image and a quarter only in the visible one, so a
    detector needs both inputs to find them all.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tint = rng.uniform(0.3, 0.6, 3).astype(np.float32)
    vi = tint * (0.8 + 0.2 * (xx / w))[..., None] + rng.normal(0, 0.03, (h, w, 3)).astype(np.float32)
    ir = 0.15 + 0.1 * (yy / h) + rng.normal(0, 0.03, (h, w)).astype(np.float32)
    colours = np.asarray([[0.9, 0.1, 0.1], [0.1, 0.85, 0.1], [0.15, 0.2, 0.95]], np.float32)
    heat = np.asarray([0.95, 0.7, 0.5], np.float32)
    boxes, classes = [], []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        for _try in range(20):
            bw, bh = rng.uniform(0.14, 0.32) * w, rng.uniform(0.14, 0.32) * h
            x1, y1 = rng.uniform(2, w - bw - 2), rng.uniform(2, h - bh - 2)
            b = np.asarray([x1, y1, x1 + bw, y1 + bh], np.float32)
            if all(_overlap(b, o) < 0.05 for o in boxes):
                break
        else:
            continue
        c = int(rng.integers(num_classes))
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        inside = (xx >= b[0]) & (xx < b[2]) & (yy >= b[1]) & (yy < b[3])
        if c % 3 == 0:
            mask = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1.0
        elif c % 3 == 1:
            mask = inside
        else:
            t = max(3.0, 0.22 * min(bw, bh))
            mask = inside & ~((xx >= b[0] + t) & (xx < b[2] - t) & (yy >= b[1] + t) & (yy < b[3] - t))
        where = rng.choice(["both", "both", "ir", "vi"])
        if where in ("both", "ir"):
            ir = np.where(mask, heat[c % 3] + rng.normal(0, 0.02, (h, w)).astype(np.float32), ir)
        if where in ("both", "vi"):
            vi = np.where(mask[..., None], colours[c % 3], vi)
        boxes.append(b)
        classes.append(c)
    ir3 = np.repeat(np.clip(ir, 0, 1)[..., None], 3, axis=-1).astype(np.float32)
    return {"ir": ir3, "vi": np.clip(vi, 0, 1).astype(np.float32),
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "classes": np.asarray(classes, np.int32),
            "name": f"synthetic_{seed:05d}"}


def _overlap(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / max(1e-6, min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])))


class SyntheticSource:
    """`count` generated pairs (`synthetic_pair(seed + i)`), same record format as `M3FDSource`."""

    def __init__(self, count: int, size: Sequence[int] = (128, 128), seed: int = 0,
                 class_names: Sequence[str] = SYNTHETIC_CLASSES):
        self.count, self.size, self.seed = int(count), tuple(size), int(seed)
        self.class_names = tuple(class_names)
        self.names = [f"synthetic_{seed + i:05d}" for i in range(self.count)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        return int(i)

    @functools.lru_cache(maxsize=256)
    def load(self, i: int) -> dict:
        return synthetic_pair(self.seed + int(i), self.size, len(self.class_names))


def write_synthetic_m3fd(root, count: int, size: Sequence[int] = (128, 128), seed: int = 0) -> Path:
    """Write generated pairs in the M3FD layout (Ir/, Vis/, Annotation/ VOC XML) with M3FD class
    names (disc -> People, block -> Car, ring -> Bus): a stand-in data set for tests."""
    from PIL import Image

    root = Path(root)
    for d in ("Ir", "Vis", "Annotation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        s = synthetic_pair(seed + i, size)
        name = f"{i:05d}"
        Image.fromarray((s["ir"][..., 0] * 255).round().astype(np.uint8), "L").save(root / "Ir" / f"{name}.png")
        Image.fromarray((s["vi"] * 255).round().astype(np.uint8), "RGB").save(root / "Vis" / f"{name}.png")
        objs = "".join(
            f"<object><name>{CLASSES[c]}</name><difficult>0</difficult><bndbox><xmin>{b[0] + 1:.1f}</xmin>"
            f"<ymin>{b[1] + 1:.1f}</ymin><xmax>{b[2]:.1f}</xmax><ymax>{b[3]:.1f}</ymax></bndbox></object>"
            for b, c in zip(s["boxes"], s["classes"]))
        (root / "Annotation" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.png</filename><size><width>{size[1]}</width><height>{size[0]}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
    return root


def build_source(cfg: Mapping[str, Any], split: str):
    """`config.data` -> the source of one split ('kind': 'm3fd' or 'synthetic')."""
    kind = cfg.get("kind", "m3fd")
    if kind == "m3fd":
        return M3FDSource(cfg["root"], split, tuple(cfg.get("class_names") or CLASSES),
                          int(cfg.get("split_seed", SPLIT_SEED)), cfg.get("split_file") or None,
                          int(cfg.get("limit", 0) or 0))
    if kind == "synthetic":
        # Every split is the same generated images: the smoke run is an overfitting check. The
        # split names are still the real dataset's, so a typo fails here as it would on M3FD.
        if split not in (*SPLITS, "all"):
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS} or 'all'")
        return SyntheticSource(int(cfg.get("count", 8)), tuple(cfg.get("size", (128, 128))),
                               int(cfg.get("seed", 0)), tuple(cfg.get("class_names") or SYNTHETIC_CLASSES))
    raise DataError(f"config.data.kind must be 'm3fd' or 'synthetic', got {kind!r}")


# ---- fixed-shape samples -----------------------------------------------------------------------
def prepare(sample: Mapping[str, Any], image_size: Sequence[int], max_boxes: int, flip: bool = False) -> dict:
    """Resize a raw sample to `image_size` (H, W) and pad its boxes to `max_boxes`.

    Returns float32 'ir', 'vi' (H, W, 3), 'boxes' (G, 4) in resized pixels, int32 'classes' (G,),
    bool 'valid' (G,), and float32 'scale' (2,) = (sy, sx) from original to resized pixels.
    """
    oh, ow = sample["vi"].shape[:2]
    h, w = int(image_size[0]), int(image_size[1])
    out = {}
    for k in ("ir", "vi"):
        img = sample[k]
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if h < oh else cv2.INTER_LINEAR)
        out[k] = np.ascontiguousarray(img[:, ::-1] if flip else img, np.float32)
    sy, sx = h / oh, w / ow
    boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4) * np.asarray([sx, sy, sx, sy], np.float32)
    classes = np.asarray(sample["classes"], np.int32).reshape(-1)
    if flip:
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    if len(boxes) > max_boxes:
        SKIPPED.skip(f"{sample.get('name', '?')}:boxes", f"{len(boxes)} boxes > max_boxes={max_boxes}; extra dropped")
        boxes, classes = boxes[:max_boxes], classes[:max_boxes]
    n = len(boxes)
    out["boxes"] = np.zeros((max_boxes, 4), np.float32)
    out["boxes"][:n] = boxes
    out["classes"] = np.zeros((max_boxes,), np.int32)
    out["classes"][:n] = classes
    out["valid"] = np.arange(max_boxes) < n
    out["scale"] = np.asarray([sy, sx], np.float32)
    return out


def train_transform(record, rng: np.random.Generator, *, source, image_size, max_boxes: int, flip: bool):
    """grain random_map: decode, random horizontal flip, resize, pad (None if unusable)."""
    sample = source.load(record)
    if sample is None:
        return None
    out = prepare(sample, image_size, max_boxes, flip=bool(flip and rng.random() < 0.5))
    del out["scale"]
    return out
