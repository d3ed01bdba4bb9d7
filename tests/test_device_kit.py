"""benchmarks/device_kit.py: the parity fixture cut to fit a device call keeps what parity reads."""

import importlib.util
import lzma
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _kit():
    spec = importlib.util.spec_from_file_location("device_kit", ROOT / "benchmarks" / "device_kit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cut_fixture_keeps_first_sample_and_exact_weights(tmp_path):
    rng = np.random.default_rng(0)
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    io = {
        "view1": rng.random((2, 3, 8, 8), dtype=np.float32),
        "mfm_ids_keep": rng.integers(0, 16, (2, 4)),
        "mask_p": rng.random(2),
        "direction": np.array("q_view2"),
        "seed": np.array(7),
        "grid": rng.random((3, 2)),  # leading axis is not the batch: kept whole
    }
    np.savez_compressed(src / "io.npz", **io)
    weights = rng.bytes(100_000)
    (src / "ucmimnet_state_dict.safetensors").write_bytes(weights)

    _kit().cut_fixture(src, dest, samples=1)

    with np.load(dest / "io.npz") as f:
        cut = {k: f[k] for k in f.files}
    assert set(cut) == set(io)
    for k in ("view1", "mfm_ids_keep", "mask_p"):
        np.testing.assert_array_equal(cut[k], io[k][:1])
    for k in ("direction", "seed", "grid"):
        np.testing.assert_array_equal(cut[k], io[k])
    with lzma.open(dest / "ucmimnet_state_dict.safetensors.xz") as f:
        assert f.read() == weights
