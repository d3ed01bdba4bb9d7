"""The entry points' persistent compilation cache (defusion_jax/compile_cache.py): where it goes,
how it is turned off, and that a second process really reuses the first one's executable.
Each case runs in a fresh interpreter: JAX fixes its cache folder at the first compilation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, jax, jax.numpy as jnp
from jax import monitoring
from defusion_jax import compile_cache
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
where = compile_cache.enable(log=lambda m: print("LOG", m))
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64)))
print(json.dumps({"dir": where, "hits": len(hits), "value": float(y),
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def _run(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("DEFUSION_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    full.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=full, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), [line for line in lines if line.startswith("LOG")]


def test_default_folder_is_per_user_and_per_machine_and_a_second_run_hits(tmp_path):
    from defusion_jax import compile_cache

    first, _ = _run(tmp_path)
    expected = tmp_path / "xdg" / "defusion_jax" / "xla" / compile_cache.machine_tag()
    assert first["dir"] == str(expected) and first["hits"] == 0
    from defusion_jax.paths import has_module

    assert first["max_size"] == (compile_cache.DEFAULT_MAX_BYTES if has_module("filelock") else -1)
    assert any(expected.iterdir()), "nothing was written to the cache"
    second, _ = _run(tmp_path)
    assert second["hits"] >= 1 and second["value"] == first["value"]


def test_off_a_given_folder_and_jaxs_own_setting(tmp_path):
    off, _ = _run(tmp_path, DEFUSION_COMPILE_CACHE="off")
    assert off["dir"] is None and not (tmp_path / "xdg").exists()
    given, _ = _run(tmp_path, DEFUSION_COMPILE_CACHE=str(tmp_path / "mine"))
    assert given["dir"] == str(tmp_path / "mine") and any((tmp_path / "mine").iterdir())
    assert given["max_size"] == -1  # a folder the user names is not capped by us
    jaxs, _ = _run(tmp_path, DEFUSION_COMPILE_CACHE=str(tmp_path / "mine"), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))
    assert jaxs["dir"] == str(tmp_path / "jax")


def test_an_unwritable_folder_turns_the_cache_off_with_a_note(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res, logs = _run(tmp_path, DEFUSION_COMPILE_CACHE=str(blocker / "cache"))
    assert res["dir"] is None and res["value"] > 0
    assert logs and "DEFUSION_COMPILE_CACHE" in logs[0]


def test_machine_tag_separates_instruction_sets(monkeypatch):
    from defusion_jax import compile_cache

    monkeypatch.setattr(compile_cache, "cpu_info", lambda: ("Some CPU", ["sse2", "avx2"]))
    avx2 = compile_cache.machine_tag()
    monkeypatch.setattr(compile_cache, "cpu_info", lambda: ("Some CPU", ["avx2", "sse2"]))
    assert compile_cache.machine_tag() == avx2  # flag order does not matter
    monkeypatch.setattr(compile_cache, "cpu_info", lambda: ("Some CPU", ["sse2", "avx2", "avx512f"]))
    assert compile_cache.machine_tag() != avx2
