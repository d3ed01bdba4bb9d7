"""JAX's persistent compilation cache for the command-line entry points (train, fuse, evaluate, and
the detection / segmentation re-evaluation commands).

Why: a second run of the same program skips XLA compilation. The README's smoke training takes
~66 s in a fresh workdir and ~37 s when its programs are cached; a folder fusion compiles the
network once per image size (10-15 s each for the official-size network on a 2-core CPU), and a
restarted pod job would otherwise recompile its step on every worker. The key JAX computes covers
the program, the JAX/XLA version, the devices, the compile options and XLA flags, so a hit is the
same executable (the smoke run's losses are identical with and without it).

DEFUSION_COMPILE_CACHE: unset = a folder under the user's cache directory
($XDG_CACHE_HOME or ~/.cache, /defusion_jax/xla/<machine>), kept under 4 GiB by JAX's
least-recently-used eviction where the `filelock` package is installed; a path (a gs:// one too) = that folder;
"0" / "off" = no cache. A cache dir set through JAX itself (JAX_COMPILATION_CACHE_DIR) is left alone.
The launch scripts point it into the run's shared workdir so that every worker of a restarted job
reads what process 0 wrote (JAX writes from process 0 only).

The cache holds compiled machine code that is loaded and run: like an exported function, it is
trusted input. Point it only at folders you (or your job) wrote. The default folder is per machine
(CPU model and features): a home directory shared between different CPUs must not hand an AVX-512
executable to a CPU without it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

from defusion_jax.paths import has_module, is_url

ENV = "DEFUSION_COMPILE_CACHE"
DEFAULT_MAX_BYTES = 4 << 30  # the default folder's cap; a folder you name is yours to size
_OFF = ("0", "off", "none", "false", "no")


def cpu_info() -> tuple[str, list[str]]:
    """The host CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere what platform knows)."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.split()
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def machine_tag() -> str:
    """A short name for this host's instruction set: architecture plus a hash of the CPU's model and flags."""
    model, flags = cpu_info()
    digest = hashlib.sha256(f"{model}|{' '.join(sorted(flags))}".encode()).hexdigest()[:12]
    return f"{platform.machine() or 'unknown'}-{digest}"


def default_dir(environ=os.environ) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "defusion_jax" / "xla" / machine_tag()


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def enable(environ=os.environ, log=_note) -> str | None:
    """Turn the cache on (before anything is compiled); returns the folder in use, or None when off.
    `log` gets the one line said when the folder cannot be used (default: a note on stderr)."""
    import jax

    already = jax.config.jax_compilation_cache_dir
    if already:
        return already
    choice = environ.get(ENV, "").strip()
    if choice.lower() in _OFF:
        return None
    target = choice or str(default_dir(environ))
    if not choice and has_module("filelock"):  # JAX evicts least recently used entries only with it
        jax.config.update("jax_compilation_cache_max_size", DEFAULT_MAX_BYTES)
    if not is_url(target):
        try:
            Path(target).mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only home must not stop a run: it only compiles every time
            log(f"compilation cache off: cannot create {target} ({e}); set {ENV} to a writable folder")
            return None
    jax.config.update("jax_compilation_cache_dir", target)
    return target
