"""The Flax network computes the official PyTorch network's function (fixture from UCMIMNet).

Reads `../shared/fixtures/defusionpp_reference` (or $DEFUSION_PARITY_FIXTURE) and compares every
`out_*`, `alt_out_*` and `tok_*` array its io.npz holds: images within 1e-4, tokens within 2e-4.
"""

import collections

import jax
import numpy as np
import pytest

from defusion_jax.api import load_model

IMAGE_ATOL, TOKEN_ATOL = 1e-4, 2e-4


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def io(fixture_dir):
    with np.load(fixture_dir / "io.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def official_pth(fixture_dir, tmp_path_factory):
    """A `.pth` wrapped the way the official trainer saves checkpoints, built from the safetensors."""
    torch = pytest.importorskip("torch", reason="torch (requirements-dev.txt) builds the .pth")
    from safetensors.torch import load_file

    sd = load_file(str(fixture_dir / "ucmimnet_state_dict.safetensors"))
    params = [torch.nn.Parameter(v) for k, v in sd.items() if "pos_embed" not in k]
    opt = torch.optim.Adam(params, lr=4e-4, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[20, 40, 45, 47], gamma=0.5)
    assert isinstance(sched.state_dict()["milestones"], collections.Counter)
    path = tmp_path_factory.mktemp("official") / "latest.pth"
    torch.save({"state_dict": sd, "optimizers": opt.state_dict(), "schedulers": sched.state_dict(),
                "epoch": 50}, path)
    return path


@pytest.fixture(scope="module")
def forward():
    """One compiled forward for both directions (a per-sample flag, True = q_view2) and both models."""
    cache = {}

    def run(model, io, direction):
        if "f" not in cache:
            cache["f"] = jax.jit(lambda p, a, b, d, k, r: model.module.apply(
                {"params": p}, a, b, direction=d, ids_keep=k, ids_restore=r, return_tokens=True))
        flags = np.full((io["view1"].shape[0],), direction == "q_view2")
        return cache["f"](model.params, _nhwc(io["view1"]), _nhwc(io["view2"]), flags,
                          io["mfm_ids_keep"].astype(np.int32), io["mfm_ids_restore"].astype(np.int32))

    return run


def _check_against_fixture(model, io, forward, check_api=True):
    assert str(io["direction"]) == "q_view2" and str(io["alt_direction"]) == "q_view1"
    main = forward(model, io, "q_view2")
    alt = forward(model, io, "q_view1")
    checked, errors = [], {}
    for key, ref in io.items():
        if key.startswith("alt_out_"):
            got, tol = alt[key[len("alt_out_"):]], IMAGE_ATOL
        elif key.startswith("out_"):
            got, tol = main[key[len("out_"):]], IMAGE_ATOL
        elif key.startswith("tok_"):
            got, tol = main["tokens"][key[len("tok_"):]], TOKEN_ATOL
        else:
            continue
        got = np.asarray(got)
        ref = _nhwc(ref) if ref.ndim == 4 else ref
        assert got.shape == ref.shape, key
        errors[key] = float(np.max(np.abs(got - ref)))
        assert errors[key] <= tol, f"{key}: max abs diff {errors[key]:.3g} > {tol}"
        checked.append(key)
    assert any(k.startswith("out_") for k in checked) and any(k.startswith("tok_") for k in checked)
    if not check_api:
        return errors
    # The user API (string directions, no MFM) agrees with the raw forward.
    api = model.decompose(_nhwc(io["view1"]), _nhwc(io["view2"]), direction="q_view1")
    np.testing.assert_allclose(np.asarray(api["fused"]), np.asarray(alt["fused"]), atol=1e-5)
    rec = model.mfm_reconstruct(_nhwc(io["view1"]), _nhwc(io["view2"]), io["mfm_ids_keep"], io["mfm_ids_restore"])
    np.testing.assert_allclose(np.asarray(rec), np.asarray(main["mfm_recon"]), atol=1e-5)
    return errors


def test_parity_safetensors(fixture_dir, io, forward):
    model = load_model(fixture_dir / "ucmimnet_state_dict.safetensors")
    errors = _check_against_fixture(model, io, forward)
    print({k: f"{v:.2e}" for k, v in errors.items()})


def test_parity_official_pth(official_pth, fixture_dir, io, forward):
    model = load_model(official_pth)
    _check_against_fixture(model, io, forward, check_api=False)
    ref = load_model(fixture_dir / "ucmimnet_state_dict.safetensors")
    jax.tree.map(np.testing.assert_array_equal, model.params, ref.params)
