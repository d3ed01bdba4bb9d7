"""Run the command under tcmalloc where the machine has it (Linux), by re-executing it once.

Why: XLA:CPU allocates an executable's whole scratch buffer on every call and frees it after. For
the trainer step (batch 4, 224 x 224) that is one 1.1 GB block, which glibc's malloc maps fresh and
unmaps again each step: ~280k page faults and ~0.7 s of kernel time per step, on top of ~1.6 s of
work. tcmalloc keeps the block mapped: 0 faults, ~15 ms kernel time per step
(the `*_minor_faults_per_call` and `*_sys_s_per_call` fields of
`benchmarks/cpu_vs_official.py`; figures in docs/benchmarks.md). glibc cannot be told to keep it
(its mmap threshold is capped at 32 MB and worker threads' arenas map large blocks regardless of
M_MMAP_MAX), so the allocator has to be preloaded, which only works at process start.

DEFUSION_TCMALLOC: unset, "auto" or "1" = use it when found; "0" = never; a path = that library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "DEFUSION_TCMALLOC"
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc(environ=os.environ) -> str | None:
    """The library to preload, or None (disabled, not Linux, or not installed)."""
    choice = environ.get(ENV, "auto")
    if choice == "0" or not sys.platform.startswith("linux"):
        return None
    if choice not in ("", "auto", "1"):
        if not Path(choice).is_file():
            raise FileNotFoundError(f"{ENV}={choice}: no such library")
        return choice
    for d in _DIRS:
        for name in _NAMES:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    return None


def preload_env(environ, library: str) -> dict | None:
    """The environment to re-run with, or None when `library` is already preloaded."""
    preloaded = _preloaded(environ)
    if library in preloaded or active(environ) == "tcmalloc":  # also one the user preloaded
        return None
    # never hand freed pages back to the kernel (gperftools' switch): otherwise other code's frees
    # in the same process (PyTorch in the benchmarks) make tcmalloc release, and refault, the block
    return {"TCMALLOC_RELEASE_RATE": "0", **environ, "LD_PRELOAD": ":".join([library, *preloaded])}


def reexec_with_tcmalloc() -> None:
    """Replace this process by the same command line with tcmalloc preloaded (same pid, so
    signals and launchers are unaffected); returns without doing anything when it is already
    preloaded, disabled or absent. Call it first thing in an entry point. Silent, so that CLI
    errors stay one line; `active()` tells (the trainer logs it, benchmarks print it)."""
    library = find_tcmalloc()
    env = preload_env(os.environ, library) if library else None
    if env is None:
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _preloaded(environ) -> list[str]:
    return [p for p in environ.get("LD_PRELOAD", "").replace(":", " ").split() if p]


def active(environ=os.environ) -> str:
    """'tcmalloc' when `environ` (this process's) preloads a tcmalloc, else 'system'."""
    return "tcmalloc" if any("tcmalloc" in Path(p).name for p in _preloaded(environ)) else "system"
