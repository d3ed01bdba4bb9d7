"""What a training run tells people: console progress, metrics.jsonl, TensorBoard, picture panels.

Only process 0 writes files; every process logs to its console. TensorBoard goes through
tensorboardX (no TensorFlow needed); `tensorboard --logdir WORKDIR/tb` shows scalars and panels.
"""

from __future__ import annotations

import datetime
import json
import logging as logging_std
import math
import os
import time
from typing import Mapping, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from defusion_jax import paths


class _LibraryInfoFilter(logging_std.Filter):
    """Drop INFO/DEBUG chatter of orbax and grain (hundreds of lines per checkpoint)."""

    NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}")

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
    """Keep the console readable: only warnings and errors from orbax and grain."""
    for handler in logging_std.getLogger().handlers + logging_std.getLogger("absl").handlers:
        if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
            handler.addFilter(_LibraryInfoFilter())
    absl_handler = getattr(logging, "get_absl_handler", lambda: None)()
    if absl_handler is not None and not any(isinstance(f, _LibraryInfoFilter) for f in absl_handler.filters):
        absl_handler.addFilter(_LibraryInfoFilter())


def _jsonable(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class MetricWriter:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard scalars and images.

    On object storage (a gs:// workdir) nothing can be appended to: the writer keeps the file's
    lines and rewrites it whole, at most every `remote_every_s` seconds and on every flush.

    A resumed run calls `resume_at(step)` before logging: rows an interrupted run wrote after its
    last checkpoint are dropped from metrics.jsonl and TensorBoard purges its events after `step`
    (`purge_step`), so neither shows the steps twice. The TensorBoard writer opens on first use."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 remote_every_s: float = 30.0):
        self.enabled = enabled
        self.workdir = paths.path(workdir)
        self._tb = None
        self._tb_dir = None
        self._purge_step = None
        self._jsonl = None
        self._remote_lines: list[str] | None = None
        # -inf, not 0.0: time.monotonic() counts from boot, so within remote_every_s of a machine's
        # start (a fresh CI container, a new pod VM) 0.0 held back the first row.
        self._remote_every_s, self._remote_written = remote_every_s, -math.inf
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        target = self.workdir / "metrics.jsonl"
        remote = paths.is_url(self.workdir)
        if remote:
            self._remote_lines = target.read_text().splitlines(keepends=True) if target.exists() else []
        else:
            self._jsonl = open(target, "a", buffering=1)
        if tensorboard:
            if remote and not paths.has_module("google.cloud.storage"):
                raise ValueError(f"TensorBoard logs in {self.workdir} need google-cloud-storage "
                                 "(pip install google-cloud-storage), or --config.tensorboard=False")
            import tensorboardX  # noqa: F401  (missing package: fail at start, not at the first step)

            self._tb_dir = str(self.workdir / "tb")

    def _board(self):
        if self._tb is None and self._tb_dir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=self._tb_dir, flush_secs=30, purge_step=self._purge_step)
        return self._tb

    def resume_at(self, step: int) -> None:
        """Forget what was logged after `step` (the checkpoint a run resumes from; 0 = a fresh start)."""
        if not self.enabled:
            return

        def keep(line):
            try:
                return json.loads(line).get("step", 0) <= step
            except ValueError:  # a row cut short by a killed process
                return False

        target = self.workdir / "metrics.jsonl"
        if self._remote_lines is None:
            self._jsonl.close()
            lines = target.read_text().splitlines(keepends=True) if target.exists() else []
        else:
            lines = self._remote_lines
        kept = [line for line in lines if keep(line)]
        if len(kept) != len(lines):
            logging.info("resuming at step %d: dropped %d rows logged after it from %s", step,
                         len(lines) - len(kept), target)
        if self._remote_lines is None:
            if len(kept) != len(lines):
                paths.write_text_whole(target, "".join(kept))
            self._jsonl = open(target, "a", buffering=1)
        else:
            self._remote_lines = kept
            self._write_remote()
        self._purge_step = int(step) + 1
        if self._tb is not None:  # opened before: reopen so that the purge takes effect
            self._tb.close()
            self._tb = None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in values.items()})
        if self._remote_lines is not None:
            self._remote_lines.append(json.dumps(row) + "\n")
            if time.monotonic() - self._remote_written >= self._remote_every_s:
                self._write_remote()
        else:
            self._jsonl.write(json.dumps(row) + "\n")
        if self._board() is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, np.number)) and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), int(step))

    def _write_remote(self) -> None:
        paths.write_text_whole(self.workdir / "metrics.jsonl", "".join(self._remote_lines))
        self._remote_written = time.monotonic()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled and self._board() is not None:
            self._tb.add_image(tag, image, int(step), dataformats="HWC")

    def text(self, tag: str, text: str) -> None:
        if self.enabled and self._board() is not None:
            self._tb.add_text(tag, text, 0)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._remote_lines is not None:
            self._write_remote()

    def close(self) -> None:
        if self._remote_lines is not None:
            self._write_remote()
            self._remote_lines = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = paths.path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """Images per second and ETA over the steps since the last report (compile time excluded)."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total, self.batch = total_steps, batch_size
        self.t_last, self.s_last = None, start_step
        self.t_start, self.s_start = None, start_step
        self.paused = 0.0

    def started(self, step: int) -> None:
        """Call after the first (compiling) step has finished."""
        self.t_last = self.t_start = time.perf_counter()
        self.s_last = self.s_start = step

    def pause(self, seconds: float) -> None:
        """Time spent on checkpoints and panels is not training throughput."""
        self.paused += seconds

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        if self.t_last is None or step <= self.s_last:
            return {}
        dt = max(now - self.t_last - self.paused, 1e-9)
        rate = (step - self.s_last) / dt
        out = {"img_per_sec": rate * self.batch, "steps_per_sec": rate,
               "eta_sec": (self.total - step) / rate if rate > 0 else float("nan")}
        self.t_last, self.s_last, self.paused = now, step, 0.0
        return out


def progress_line(step: int, total: int, metrics: Mapping[str, float], speed: Mapping[str, float],
                  keys: Sequence[str] = ()) -> str:
    parts = [f"step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4g}")
    # the last path component names a term, unless two keys share it (cud/common, mcud/common)
    last = [k.split("/")[-1] for k in keys]
    label = {k: (k if last.count(n) > 1 else n) for k, n in zip(keys, last)}
    terms = [f"{label[k]} {metrics[k]:.3g}" for k in keys if k in metrics]
    if terms:
        parts.append("(" + ", ".join(terms) + ")")
    if speed:
        eta = speed["eta_sec"]
        eta_s = str(datetime.timedelta(seconds=int(eta))) if math.isfinite(eta) else "?"
        parts.append(f"{speed['img_per_sec']:.1f} img/s")
        parts.append(f"ETA {eta_s}")
    return " | ".join(parts)


def to_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(columns: Mapping[str, np.ndarray], pad: int = 4, label_height: int = 14,
               min_side: int = 112) -> np.ndarray:
    """Rows = samples, columns = named (B, H, W, C) images in [0,1] (clamped), titled; uint8 HWC."""
    names = list(columns)
    arrays = [to_uint8(columns[n][..., :3] if columns[n].ndim == 4 else columns[n][..., None]) for n in names]
    zoom = max(1, -(-min_side // min(arrays[0].shape[1:3])))  # small crops (smoke runs) enlarged, pixels kept sharp
    if zoom > 1:
        arrays = [a.repeat(zoom, axis=1).repeat(zoom, axis=2) for a in arrays]
    b, h, w = arrays[0].shape[:3]
    canvas = Image.new("RGB", (len(names) * (w + pad) + pad, label_height + b * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, (name, arr) in enumerate(zip(names, arrays)):
        x = pad + j * (w + pad)
        draw.text((x, 1), name, fill=(0, 0, 0))
        for i in range(b):
            canvas.paste(Image.fromarray(arr[i]), (x, label_height + pad + i * (h + pad)))
    return np.asarray(canvas)


def save_panel(workdir: str | os.PathLike, step: int, grid: np.ndarray):
    out = paths.path(workdir) / "panels"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{step:07d}.png"
    with path.open("wb") as f:  # a file object: PIL cannot write a gs:// path itself
        Image.fromarray(grid).save(f, format="PNG")
    return path
