"""The tcmalloc re-execution of the command-line entry points (defusion_jax.allocator)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from defusion_jax import allocator

ROOT = Path(__file__).resolve().parents[1]


def test_preload_env_prepends_once():
    env = allocator.preload_env({"LD_PRELOAD": "/x/libfoo.so", "A": "1"}, "/lib/libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/x/libfoo.so" and env["A"] == "1"
    assert env["TCMALLOC_RELEASE_RATE"] == "0"
    assert allocator.preload_env({"TCMALLOC_RELEASE_RATE": "5"}, "/l/libtcmalloc.so.4")["TCMALLOC_RELEASE_RATE"] == "5"
    assert allocator.preload_env(env, "/lib/libtcmalloc_minimal.so.4") is None
    # a tcmalloc the user preloaded themselves (any path) is left alone
    assert allocator.preload_env({"LD_PRELOAD": "/opt/libtcmalloc.so.4"}, "/lib/libtcmalloc_minimal.so.4") is None


def test_find_honours_the_switch(tmp_path):
    assert allocator.find_tcmalloc({"DEFUSION_TCMALLOC": "0"}) is None
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    if sys.platform.startswith("linux"):
        assert allocator.find_tcmalloc({"DEFUSION_TCMALLOC": str(lib)}) == str(lib)
        with pytest.raises(FileNotFoundError, match="no such library"):
            allocator.find_tcmalloc({"DEFUSION_TCMALLOC": str(tmp_path / "missing.so")})


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to find a library to preload")
def test_reexec_keeps_the_command_line_and_runs_once(tmp_path):
    # preload the C library the interpreter already uses: harmless, and always present
    libc = next(line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "/libc.so" in line or "/libc-" in line)
    script = tmp_path / "entry.py"
    script.write_text("import os, sys\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\n"
                      "from defusion_jax import allocator\n"
                      "allocator.reexec_with_tcmalloc()\n"
                      "print(os.getpid(), os.environ.get('LD_PRELOAD', '-'), sys.argv[1:])\n")
    env = dict(os.environ, DEFUSION_TCMALLOC=libc)
    env.pop("LD_PRELOAD", None)
    r = subprocess.run([sys.executable, str(script), "--flag=1", "x"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    _, preload, argv = r.stdout.strip().split(" ", 2)
    assert preload == libc and argv == "['--flag=1', 'x']"
    assert r.stderr == ""  # silent: CLI errors stay one line
    # switched off: no re-execution, no message
    r = subprocess.run([sys.executable, str(script)], env=dict(env, DEFUSION_TCMALLOC="0"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" ", 2)[1] == "-"
