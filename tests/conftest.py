"""Shared test set-up: full float32 matmuls (parity holds on GPUs too) and the shared/ folder."""

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# The entry points turn on a persistent compilation cache under ~/.cache (compile_cache.py); tests
# that call them, in this process or in subprocesses, must not write there or depend on its state.
os.environ.setdefault("DEFUSION_COMPILE_CACHE", "off")

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
    """The smoke config trained once per session (tests/test_train.py: `train_smoke_reference`),
    shared by the training tests of every module; defined here so that it is one instance."""
    from test_train import train_smoke_reference

    return train_smoke_reference(tmp_path_factory.mktemp("smoke"))
