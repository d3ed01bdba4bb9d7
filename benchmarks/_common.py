"""Shared helpers of the benchmarks (not a library module: imported only by benchmarks/*.py).

Every benchmark prints exactly one JSON line on stdout (diagnostics go to stderr). XLA flags are
process-wide and must be set before jax is imported, so each script calls `set_xla_flags()` first;
the library itself never sets flags.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from defusion_jax import allocator  # noqa: E402  (stdlib only; before jax, as it may re-execute us)

allocator.reexec_with_tcmalloc()  # as `python -m defusion_jax.main` does: measure what users run

# Flags measured to help (or not hurt) this project's step on XLA:CPU; see docs/benchmarks.md.
CPU_XLA_FLAGS: tuple[str, ...] = ()


def set_xla_flags(extra: str | None = None, cpu_defaults: bool = True) -> str:
    """Append the benchmark's XLA flags to $XLA_FLAGS (before jax is imported); returns them."""
    if "jax" in sys.modules:
        raise RuntimeError("set_xla_flags() must run before jax is imported")
    flags = os.environ.get("XLA_FLAGS", "").split()
    if cpu_defaults:
        flags += [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in " ".join(flags)]
    if extra:
        flags += extra.split()
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]


def enable_compilation_cache() -> None:
    """The entry points' persistent compilation cache (defusion_jax/compile_cache.py; compile time is never timed)."""
    from defusion_jax import compile_cache

    compile_cache.enable(log=log)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    """The one JSON line a benchmark prints."""
    print(json.dumps(record, sort_keys=False, default=_jsonable), flush=True)


def finish(record: dict) -> int:
    """Close a benchmark: peak memory and the load at the end go into its one JSON line."""
    record.update(peak_memory())
    record["loadavg_end"] = loadavg()
    emit(record)
    return 0


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    except ImportError:
        pass
    return str(x)


def process_counters() -> tuple[int, float]:
    """(minor page faults, kernel CPU seconds) of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt, os.times().system


def add_counts(counts: dict, start: tuple[int, float], calls: int) -> None:
    """Add what `process_counters()` grew by since `start`, over `calls` calls, to `counts`."""
    faults, sys_s = process_counters()
    counts["minor_faults"] = counts.get("minor_faults", 0) + faults - start[0]
    counts["sys_s"] = counts.get("sys_s", 0.0) + sys_s - start[1]
    counts["calls"] = counts.get("calls", 0) + calls


def time_calls(fn, n: int, sync, counts: dict | None = None) -> list[float]:
    """Wall seconds of `n` calls of fn(), each followed by sync(result); with `counts`, also the
    page faults and kernel time they cost (`add_counts`, `per_call`)."""
    out, start = [], process_counters()
    for _ in range(n):
        t0 = time.perf_counter()
        sync(fn())
        out.append(time.perf_counter() - t0)
    if counts is not None:
        add_counts(counts, start, n)
    return out


def per_call(counts: dict, prefix: str) -> dict:
    """`time_calls` counts as JSON fields: page faults and kernel seconds per call."""
    n = max(counts.get("calls", 0), 1)
    return {f"{prefix}_minor_faults_per_call": round(counts.get("minor_faults", 0) / n),
            f"{prefix}_sys_s_per_call": round(counts.get("sys_s", 0.0) / n, 3)}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def cpu_model() -> str:
    """The host CPU's model name and vector extensions: figures from different CPU kinds (AVX2 vs
    AVX-512) are not comparable, and the machines this project is measured on differ."""
    from defusion_jax.compile_cache import cpu_info

    name, flags = cpu_info()
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else ""
    return f"{name} ({isa})" if isa else name


def host_info() -> dict:
    import flax
    import jax

    d = jax.devices()[0]
    return {"device": f"{d.platform}:{getattr(d, 'device_kind', '?')}", "device_count": jax.device_count(),
            "host_cpus": os.cpu_count(), "cpu": cpu_model(), "jax": jax.__version__,
            "flax": flax.__version__, "python": platform.python_version(), "allocator": allocator.active()}


def peak_memory() -> dict:
    """Peak bytes: the accelerator's allocator peak where it reports one, else the process's peak
    resident set (CPU backend; includes Python, compiled code and everything else)."""
    import jax

    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_mem_bytes": int(stats["peak_bytes_in_use"]), "peak_mem_kind": "device allocator peak"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mem_bytes": int(rss_kib) * 1024, "peak_mem_kind": "process max RSS (CPU backend)"}


def compiled_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled computation (None where the backend gives none)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def matmul_peak_flops(dtype="float32", n: int | None = None, seconds: float = 2.0) -> dict:
    """Achievable matmul FLOP/s on device 0, measured now: the MFU denominator.

    A square n x n matmul repeated inside one jit (so dispatch does not count), in `dtype`; n
    defaults to 8192 on accelerators and 1024 on CPU.
    """
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    if n is None:
        n = 1024 if dev.platform == "cpu" else 8192
    reps = 4 if dev.platform == "cpu" else 16
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)

    @jax.jit
    def f(a, b):
        def body(i, acc):
            return acc + jnp.dot(a + acc[0, 0].astype(dtype), b, preferred_element_type=jnp.float32).astype(dtype)
        return jax.lax.fori_loop(0, reps, body, jnp.zeros((n, n), dtype))

    f(a, b).block_until_ready()
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"matmul_peak_flops": 2.0 * n**3 * reps / best, "matmul_peak_n": n, "matmul_peak_dtype": str(dtype)}
