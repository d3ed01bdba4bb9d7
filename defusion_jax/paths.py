"""Workdirs that may live on Google Cloud Storage (gs://): a pod's workers share one there.

Local paths stay `pathlib.Path` (absolute). URLs become `etils.epath.Path`, the pathlib-like class
orbax itself uses, so the trainer's `/`, `mkdir`, `open`, `read_text` / `write_text` and `iterdir`
work on both. Without this, `Path("gs://bucket/run")` is the *local* folder `gs:/bucket/run`: every
worker of a pod would write its own unshared copy and a restarted job would find no checkpoint.

What object stores do not do: append (gcsfs silently rewrites a file opened with "a") or rename
atomically. So a file that grows (metrics.jsonl) is rewritten whole, and small files are written in
one call (an object write is all-or-nothing on GCS).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Union

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# What each scheme needs beyond this project's requirements (etils' fsspec backend, or TensorFlow).
# Only gs:// is wired and tested (the pod recipe); etils would take s3:// too, untested here.
_NEEDS = {"gs": ("gcsfs", "pip install gcsfs")}

AnyPath = Union[Path, "epath.Path"]  # noqa: F821


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def is_url(p: str | os.PathLike) -> bool:
    return bool(_URL.match(os.fspath(p)))


def path(p: str | os.PathLike) -> AnyPath:
    """An absolute local `Path`, or an `epath.Path` for gs:// (checked to be usable here)."""
    s = os.fspath(p)
    if not is_url(s):
        return Path(s).absolute()
    scheme = s.split("://", 1)[0].lower()
    if scheme not in _NEEDS:
        raise ValueError(f"{s}: unsupported storage scheme {scheme}:// (local paths and gs:// work)")
    module, hint = _NEEDS[scheme]
    if not has_module(module) and not has_module("tensorflow"):
        raise ValueError(f"{s}: {scheme}:// paths need the {module} package here ({hint})")
    from etils import epath

    return epath.Path(s)


def write_text_whole(target: AnyPath, text: str) -> None:
    """Replace a small file's contents so that readers see the old or the new text, never a part."""
    if isinstance(target, Path):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    else:
        target.write_text(text)


@contextlib.contextmanager
def staged(target: AnyPath):
    """A local folder to write a report tree into; for a remote `target` it is copied up at the end
    (report writers use plain files, PIL and csv, which only write local paths)."""
    if isinstance(target, Path):
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="defusion_stage_") as tmp:
        yield Path(tmp)
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                dst = target / f.relative_to(tmp).as_posix()
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(f.read_bytes())
