"""Shared test set-up: full float32 matmuls (parity holds on GPUs too) and the shared/ folder."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# The entry points turn on a persistent compilation cache under ~/.cache (compile_cache.py); tests
# must not write there or depend on what an earlier run left. They share one throw-away cache
# instead: about twenty processes (this one, pytest-xdist workers, the `main` and `fuse`
# subprocesses) compile the same smoke-config programs, ~50 s of XLA time each on 2 CPU cores,
# and a cache hit is the same executable (compile_cache.py). The pytest process that creates the
# folder removes it at the end; workers and subprocesses inherit it through the environment.
# Tests of the cache itself, and of Ctrl-C during compilation, set their own value.
if "DEFUSION_COMPILE_CACHE" not in os.environ:
    os.environ["DEFUSION_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="defusion-test-xla-")
    os.environ["DEFUSION_TEST_CACHE_OWNER"] = str(os.getpid())
from defusion_jax import compile_cache  # noqa: E402 - after the environment it reads

compile_cache.enable()  # this process too: in-process training and fusion tests compile the same programs


def pytest_unconfigure(config):
    if os.environ.get("DEFUSION_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["DEFUSION_COMPILE_CACHE"], ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEFUSION_SHARED", REPO.parent / "shared"))
FIXTURE = Path(os.environ.get("DEFUSION_PARITY_FIXTURE", SHARED / "fixtures" / "defusionpp_reference"))


def need_shared(path: Path = SHARED) -> Path:
    if not path.exists():
        pytest.skip(f"*** SKIPPED: {path} is absent; these tests need the project's shared/ folder "
                    "next to the repository (or DEFUSION_SHARED / DEFUSION_PARITY_FIXTURE) ***")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return need_shared()


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return need_shared(FIXTURE)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The smoke config trained once per test run (tests/test_train.py: `train_smoke_reference`),
    shared by the training tests of every module and, under pytest-xdist, by every worker: the
    first to need it trains under a file lock in the run's shared temp folder, the others wait
    and read its result."""
    import fcntl

    from test_train import train_smoke_reference

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-user/pytest-N/: common to the workers of this run
    result = root / "smoke_result.json"
    with open(root / "smoke.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            workdir, status, seconds = train_smoke_reference(root / "smoke")
            result.write_text(json.dumps({"workdir": str(workdir), "status": status, "seconds": seconds}))
    saved = json.loads(result.read_text())
    return Path(saved["workdir"]), saved["status"], saved["seconds"]
