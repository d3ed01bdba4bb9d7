"""Eq. 1 view generator: upsampling, uncovered-pixel assignment, swap, statistics, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defusion_jax import views as V

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- nearest upsampling ------------------------------------------------------------------------
@pytest.mark.parametrize("g,out", [(13, 224), (26, 224), (27, 224), (13, 64), (27, 64), (26, 96)])
def test_nearest_indices_match_torch_interpolate(g, out):
    torch = pytest.importorskip("torch", reason="torch (requirements-dev) is the reference for 'nearest'")
    grid = torch.arange(g * g, dtype=torch.float32).reshape(1, 1, g, g)
    ref = torch.nn.functional.interpolate(grid, size=(out, out), mode="nearest")[0, 0].numpy()
    ours = np.asarray(V.upsample_nearest(jnp.arange(g * g, dtype=jnp.float32).reshape(g, g), (out, out)))
    np.testing.assert_array_equal(ours, ref)


def test_upsample_hand_made():
    grid = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    up = np.asarray(V.upsample_nearest(grid, (4, 6)))
    np.testing.assert_array_equal(up, [[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 1]] * 2)


# ---- deterministic assembly ----------------------------------------------------------------------
def test_assemble_masks_hand_made():
    a = np.array([[1, 0], [0, 0]], np.float32)
    b = np.array([[1, 1], [0, 0]], np.float32)
    c = np.array([[0, 0], [1, 0]], np.float32)  # uncovered (1,0) -> A, (1,1) -> B
    m1, m2 = V.assemble_masks(a, b, c, False)
    np.testing.assert_array_equal(m1, [[1, 0], [1, 0]])
    np.testing.assert_array_equal(m2, [[1, 1], [0, 1]])
    s1, s2 = V.assemble_masks(a, b, c, True)
    np.testing.assert_array_equal(s1, m2)
    np.testing.assert_array_equal(s2, m1)


def _uniforms(p_u, sizes_u, s, t, grids):
    """Scalars (p, coarse, fine, third-fine, s, t) and 7 grids of 27x27 uniforms."""
    scal = np.array([[p_u, 0.0, sizes_u[0], sizes_u[1], s, t]], np.float32)
    return jnp.asarray(scal), jnp.asarray(np.stack(grids)[None].astype(np.float32))


def test_masks_from_uniforms_branches():
    cfg = V.ViewConfig(p_range=(0.0, 1.0))  # p = the uniform itself
    hw = (54, 54)
    on, off = np.zeros((27, 27)), np.ones((27, 27))  # uniform 0 < p -> cell 1; uniform 1 -> cell 0
    # A = on*on, B = off: view 1 sees everything, view 2 nothing -> no uncovered pixel.
    sc, gr = _uniforms(0.5, (0.0, 0.0), 0.1, 0.2, [on, on, off, off, on, on, on])
    m1, m2, p = V.masks_from_uniforms(sc, gr, hw, cfg)
    assert float(p[0]) == 0.5
    assert np.all(np.asarray(m1) == 1) and np.all(np.asarray(m2) == 0)
    # swap draw t >= 0.5 exchanges the views
    sc, gr = _uniforms(0.5, (0.0, 0.0), 0.1, 0.7, [on, on, off, off, on, on, on])
    m1, m2, _ = V.masks_from_uniforms(sc, gr, hw, cfg)
    assert np.all(np.asarray(m1) == 0) and np.all(np.asarray(m2) == 1)
    # nothing covered: the third grid decides. Its coarse grid (s < 0.33) is on, fine off.
    empty = [off, off, off, off]
    sc, gr = _uniforms(0.5, (0.0, 0.0), 0.1, 0.2, empty + [on, off, off])
    m1, m2, _ = V.masks_from_uniforms(sc, gr, hw, cfg)
    assert np.all(np.asarray(m1) == 1) and np.all(np.asarray(m2) == 0)
    sc, gr = _uniforms(0.5, (0.0, 0.0), 0.5, 0.2, empty + [on, off, on])  # s in [0.33,0.66): g2 grid
    m1, m2, _ = V.masks_from_uniforms(sc, gr, hw, cfg)
    assert np.all(np.asarray(m1) == 0) and np.all(np.asarray(m2) == 1)
    sc, gr = _uniforms(0.5, (0.0, 0.0), 0.9, 0.2, empty + [off, off, on])  # s >= 0.66: g3 grid
    m1, m2, _ = V.masks_from_uniforms(sc, gr, hw, cfg)
    assert np.all(np.asarray(m1) == 1)


def test_fine_grid_size_choice():
    """26 vs 27 is a per-sample choice: a grid whose 27th row/column differs tells them apart."""
    cfg = V.ViewConfig(p_range=(0.0, 1.0))
    hw = (54, 54)
    on, off = np.zeros((27, 27)), np.ones((27, 27))
    fine = np.zeros((27, 27))
    fine[26, :] = 1.0  # row 27 is 'off' -> only visible with the 27 grid
    for size_u, expect_last_row in ((0.2, 1.0), (0.7, 0.0)):  # < 0.5 -> 26, else 27
        sc, gr = _uniforms(0.5, (size_u, 0.0), 0.1, 0.2, [on, fine, off, off, off, off, off])
        m1, m2, _ = V.masks_from_uniforms(sc, gr, hw, cfg)
        assert float(m1[0, -1, 0]) == expect_last_row
        assert float(m1[0, 0, 0]) == 1.0


def test_degrade_and_targets():
    rng = np.random.default_rng(0)
    clean = rng.random((2, 8, 8, 3)).astype(np.float32)
    m1 = (rng.random((2, 8, 8)) < 0.6).astype(np.float32)
    m2 = np.where(m1 == 0, 1.0, (rng.random((2, 8, 8)) < 0.5)).astype(np.float32)
    n1, n2 = rng.random((2, 2, 8, 8, 3)).astype(np.float32)
    v1, v2 = V.degrade_eq1(clean, m1, m2, n1, n2)
    np.testing.assert_array_equal(np.where(m1[..., None] == 1, clean, n1), v1)
    np.testing.assert_array_equal(np.where(m2[..., None] == 1, clean, n2), v2)
    t = V.cud_targets(jnp.asarray(clean), jnp.asarray(m1), jnp.asarray(m2))
    np.testing.assert_allclose(t["common"] + t["unique1"] + t["unique2"], clean, atol=1e-7)
    np.testing.assert_array_equal(t["common_mask"], m1 * m2)


# ---- the reference fixture ---------------------------------------------------------------------
def _official_draws(rs, size=224):
    """The fixture generator's draws, in its documented order (fixture README, 'Inputs')."""
    g2, g3 = rs.randint(26, 28), rs.randint(26, 28)
    p = 0.1 + rs.uniform() / 1.12
    grids = [rs.uniform(size=(13, 13)) < p, rs.uniform(size=(g2, g2)) < p,
             rs.uniform(size=(13, 13)) < p, rs.uniform(size=(g2, g2)) < p]
    s = rs.uniform()
    n = 13 if s < 0.33 else (g2 if s < 0.66 else g3)
    third = rs.uniform(size=(n, n)) < p
    t = rs.uniform()
    noise = np.clip(np.abs(rs.standard_normal((2, 3, size, size))), 0, 1).astype(np.float32)
    return dict(g2=g2, g3=g3, p=p, grids=grids, third=third, s=s, t=t, noise=noise)


def test_fixture_masks_rebuilt_exactly(fixture_dir):
    """Re-draw the fixture's raw Bernoulli grids from its RandomState(0) (checked against the stored
    p, grid sizes, choice and swap draws), then build the masks and views with our functions."""
    io = np.load(fixture_dir / "io.npz")
    rs = np.random.RandomState(int(io["seed"]))
    for i in range(2):
        rs.uniform(size=(3, 8, 8))  # the clean image's draws (not needed here)
        rs.uniform(size=(3, 224, 224))
        d = _official_draws(rs)
        assert d["p"] == pytest.approx(float(io["mask_p"][i]), abs=0)
        assert [13, d["g2"], d["g3"]] == list(io["mask_grid_num"][i])
        assert d["third"].shape[0] == int(io["mask_grid3_num_used"][i])
        assert d["s"] == pytest.approx(float(io["mask_grid3_choice_rand"][i]), abs=0)
        assert d["t"] == pytest.approx(float(io["mask_swap_rand"][i]), abs=0)
        up = lambda g: V.upsample_nearest(jnp.asarray(g, jnp.float32), (224, 224))  # noqa: E731
        a = up(d["grids"][0]) * up(d["grids"][1])
        b = up(d["grids"][2]) * up(d["grids"][3])
        m1, m2 = V.assemble_masks(a, b, up(d["third"]), d["t"] >= 0.5)
        np.testing.assert_array_equal(np.asarray(m1), io["mask1"][i])
        np.testing.assert_array_equal(np.asarray(m2), io["mask2"][i])
        clean = io["clean"][i].transpose(1, 2, 0)[None]
        v1, v2 = V.degrade_eq1(clean, m1[None], m2[None], d["noise"][0].transpose(1, 2, 0)[None],
                               d["noise"][1].transpose(1, 2, 0)[None])
        np.testing.assert_allclose(np.asarray(v1[0]), io["view1"][i].transpose(1, 2, 0), atol=1e-6)
        np.testing.assert_allclose(np.asarray(v2[0]), io["view2"][i].transpose(1, 2, 0), atol=1e-6)


# ---- statistics of the on-device generator -----------------------------------------------------
@pytest.fixture(scope="module")
def many_views():
    clean = jnp.asarray(np.random.default_rng(0).random((384, 32, 32, 3), np.float32))
    return clean, jax.device_get(jax.jit(V.make_views)(jax.random.key(0), clean))


def test_views_cover_and_compose(many_views):
    clean, v = many_views
    clean = np.asarray(clean)
    for m in (v["mask1"], v["mask2"]):
        assert set(np.unique(m)) <= {0.0, 1.0}
    assert np.all(v["mask1"] + v["mask2"] >= 1), "every pixel must be seen by at least one view"
    for k in ("1", "2"):
        m = v["mask" + k][..., None]
        view = v["view" + k]
        np.testing.assert_array_equal(np.where(m == 1, view, clean), clean)
        noise = view[np.broadcast_to(m == 0, view.shape)]
        assert noise.min() >= 0 and noise.max() <= 1
        assert 0.55 < noise.mean() < 0.65  # E[min(|N(0,1)|, 1)] = 0.5953
    np.testing.assert_allclose(v["common"] + v["unique1"] + v["unique2"], clean, atol=1e-6)


def test_views_statistics(many_views):
    _, v = many_views
    lo, hi = V.ViewConfig().p_range
    p = v["p"]
    assert p.min() >= lo and p.max() < hi
    assert abs(p.mean() - (lo + hi) / 2) < 0.05
    common = v["common_mask"].reshape(len(p), -1).mean(axis=1)
    expected = (hi**5 - lo**5) / (5 * (hi - lo))  # E[p^4] for p ~ U[lo, hi)
    assert abs(common.mean() - expected) < 0.03, (common.mean(), expected)
    # per sample the common share follows p^4 (coarse AND fine grid in each view)
    assert np.corrcoef(common, p**4)[0, 1] > 0.9
    # each view's own mask before the uncovered assignment has mean p^2; after it, more
    m1 = v["mask1"].reshape(len(p), -1).mean(axis=1)
    assert np.all(m1 + v["mask2"].reshape(len(p), -1).mean(axis=1) >= 1 - 1e-6)


SHARDING_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    from defusion_jax import views as V, sharding as sh
    assert jax.device_count() == 8
    clean = jnp.asarray(np.random.default_rng(0).random((16, 32, 32, 3), np.float32))
    ref = jax.device_get(jax.jit(V.make_views)(jax.random.key(3), clean))
    for kind in ("auto", "explicit"):
        mesh = sh.make_mesh([("data", -1)], kind)
        with jax.set_mesh(mesh):
            x = jax.device_put(clean, sh.batch_sharding(mesh, 4))
            f = jax.jit(V.make_views)
            if kind == "explicit":
                types = jax.eval_shape(f, jax.random.key(3), x)
                assert "@data" in str(jax.typeof(types["mask1"])) or types["mask1"].sharding.spec[0] == ("data",), types["mask1"]
            out = f(jax.random.key(3), x)
            comm = sh.collectives(f.lower(jax.random.key(3), x).compile())
        for k, a in out.items():
            spec = a.sharding.spec
            assert spec and spec[0] in ("data", ("data",)), (kind, k, spec)
            assert not a.sharding.is_fully_replicated, (kind, k)
            np.testing.assert_array_equal(np.asarray(a), ref[k]), (kind, k)
        assert not comm, (kind, comm)
        print(kind, "ok", {k: str(v.sharding.spec) for k, v in out.items() if k.startswith("mask")})
""")


@pytest.mark.slow
def test_masks_are_batch_sharded_on_8_devices():
    """Generated (B, H, W) masks are sharded over the batch in Auto and Explicit meshes, equal the
    single-device values, and the compiled program needs no collective (each device builds its rows)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "auto ok" in r.stdout and "explicit ok" in r.stdout
