"""8 fake CPU devices: a sharded step equals the single-device step (views, loss, gradients).

Runs in a subprocess with its own XLA_FLAGS, so the rest of the suite keeps one device. The
comparison runs the model in float64: then a correct sharded step agrees to ~1e-12 and anything
that really differs (a mask or dropout pattern, a reduction) shows up as a large error. (In float32
the per-device batch changes XLA's blocking of the matmuls; through ~20 layers and the backward
pass that leaves up to ~2e-4 of an array's largest value on a few bias gradients.)
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates on CPU
    jax.config.update("jax_enable_x64", True)
    from configs.pretrain import get_config
    from defusion_jax import sharding as sh, views as V, train
    from defusion_jax.tasks.pretrain import PretrainTask

    assert jax.device_count() == 8, jax.devices()
    cfg = get_config("smoke")
    cfg.batch_size = 8
    cfg.model.dropout = 0.1  # dropout masks must not depend on the sharding either
    cfg.compute_dtype = "float64"
    rng = np.random.default_rng(0)
    batches = {"single": {"image": rng.random((8, 64, 64, 3))},
               "multi": {"ir": rng.random((8, 64, 64, 3)), "vi": rng.random((8, 64, 64, 3))}}
    key = jax.random.key(42)

    one = sh.make_mesh((("data", -1),), devices=jax.devices()[:1])
    task0 = PretrainTask(cfg, one)
    to64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
    frozen_host = to64(task0.load_frozen())
    params_host = to64(jax.device_get(jax.jit(task0.init_params)(jax.random.key(0))))

    def run(mesh, rules, kinds):
        task = PretrainTask(cfg, mesh)
        task.load_frozen()
        shardings = sh.tree_shardings(params_host, mesh, rules, fsdp_min_size=4096)
        n_sharded = sum(any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
        params = jax.device_put(params_host, shardings)
        frozen = jax.device_put(frozen_host, sh.replicated(mesh))
        out = {"n_sharded": n_sharded}
        with jax.set_mesh(mesh):
            for kind in kinds:
                b = {k: jax.device_put(v, sh.batch_sharding(mesh, v.ndim)) for k, v in batches[kind].items()}
                f = jax.jit(jax.value_and_grad(train.task_loss(task), has_aux=True))
                (loss, _), grads = f(params, frozen, b, key, 0)
                out[kind] = (loss, grads)
                if kind == "single":  # the views the step built (same key split as the loss)
                    views = jax.jit(lambda x, k: V.make_views(jax.random.split(k, 4)[0], x, task.view_cfg))(
                        b["image"], key)
                    spec = views["mask1"].sharding.spec
                    out["mask_spec"] = str(spec)
                    assert mesh.size == 1 or spec[0] in ("data", ("data",)), spec
                    out["views"] = views
        return jax.device_get(out)

    def close(a, b, what):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.abs(a).max(), 1e-30)
        err = np.abs(a - b).max() / scale
        assert err <= 1e-5, f"{what}: max error {err:.2e} of the largest value {scale:.3g}"
        return err

    ref = run(one, ((".*", "replicate"),), ("single", "multi"))
    eight = sh.make_mesh((("data", -1),))
    explicit = sh.make_mesh((("data", -1),), "explicit")  # shardings in the types: no op may guess
    worst = 0.0
    for name, mesh, rules, kinds in (("dp", eight, ((".*", "replicate"),), ("single", "multi")),
                                     ("fsdp", eight, ((".*", "fsdp"),), ("single",)),
                                     ("explicit fsdp", explicit, ((".*", "fsdp"),), ("single", "multi"))):
        got = run(mesh, rules, kinds)
        if name.endswith("fsdp"):
            assert got["n_sharded"] > 20, got["n_sharded"]
        for k in ref["views"]:
            np.testing.assert_array_equal(got["views"][k], ref["views"][k], err_msg=f"{name} view {k}")
        for kind in kinds:
            worst = max(worst, close(ref[kind][0], got[kind][0], f"{name} {kind} loss"))
            flat_ref = jax.tree_util.tree_leaves_with_path(ref[kind][1])
            # The key bias of an attention gets no gradient in exact arithmetic (a softmax ignores a
            # constant shift), only rounding noise: check it is negligible instead of comparing noise.
            top = max(np.abs(g).max() for _, g in flat_ref)
            for (path, g0), g1 in zip(flat_ref, jax.tree.leaves(got[kind][1]), strict=True):
                where = jax.tree_util.keystr(path)
                if where.endswith("['key']['bias']"):
                    assert max(np.abs(g0).max(), np.abs(g1).max()) < 1e-6 * top, where
                    continue
                worst = max(worst, close(g0, g1, f"{name} {kind} grad {where}"))
        print(name, "ok", got["mask_spec"], "sharded params:", got["n_sharded"])
    print(f"worst relative difference {worst:.2e}")

    try:
        sh.batch_size_per_device(eight, 12)
    except ValueError as e:
        assert "does not divide over the 8" in str(e), e
        print("batch error ok:", e)
""")


@pytest.mark.slow
def test_sharded_step_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    for name in ("dp", "fsdp", "explicit fsdp", "batch error"):
        assert f"\n{name} ok" in "\n" + r.stdout, name
    print(r.stdout)


COMM_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from configs.pretrain import get_config
    from defusion_jax import sharding as sh, train
    from defusion_jax.models.defusion import DeFusionPP
    from defusion_jax.tasks.pretrain import PretrainTask

    assert jax.device_count() == 2, jax.devices()
    cfg = get_config("smoke")
    cfg.batch_size = 4
    mesh = sh.make_mesh((("data", -1),))
    task = PretrainTask(cfg, mesh)
    frozen = jax.device_put(task.load_frozen(), sh.replicated(mesh))
    params = jax.device_put(jax.jit(task.init_params)(jax.random.key(0)), sh.replicated(mesh))
    rng = np.random.default_rng(0)
    x = rng.random((4, 64, 64, 3), np.float32)
    put = lambda b: {k: jax.device_put(v, sh.batch_sharding(mesh, v.ndim)) for k, v in b.items()}
    with jax.set_mesh(mesh):
        for kind, b in (("single", {"image": x}), ("multi", {"ir": x, "vi": x[::-1]})):
            grad = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
            comm = sh.collectives(grad.lower(params, frozen, put(b), jax.random.key(1), 0).compile())
            # data parallel: the gradients' all-reduce, nothing that moves activations
            assert set(comm) == {"all-reduce"}, (kind, comm)
            print(kind, "step ok", comm)
        b = put({"a": x, "b": x[::-1]})
        fuse = jax.jit(lambda p, a, b: task.model.apply({"params": p}, a, b, method=DeFusionPP.fuse))
        comm = sh.collectives(fuse.lower(params, b["a"], b["b"]).compile())
        assert not comm, comm
        print("fuse ok")

    # FSDP: the split parameters are gathered where the step uses them (train.task_loss), in both
    # mesh modes; Auto mode alone also moved activations (all-to-alls, collective-permutes)
    for kind in ("auto", "explicit"):
        mesh = sh.make_mesh((("data", -1),), kind)
        split = jax.device_put(params, sh.tree_shardings(params, mesh, ((".*", "fsdp"),), fsdp_min_size=1024))
        with jax.set_mesh(mesh):
            grad = jax.jit(jax.value_and_grad(train.task_loss(task), has_aux=True))
            comm = sh.collectives(grad.lower(split, jax.device_put(frozen, sh.replicated(mesh)), put({"image": x}),
                                             jax.random.key(1), 0).compile())
        assert set(comm) == {"all-gather", "all-reduce"}, (kind, comm)
        print(kind, "fsdp ok", comm)
""")


@pytest.mark.slow
def test_data_parallel_step_exchanges_only_gradients():
    """Under a batch-sharded 2-device mesh the training step's only collectives are the gradient
    all-reduces and fusion has none: the two views of a sample, stacked for the shared encoder and
    the shared CA blocks, stay on the sample's device (`models.defusion.stack_pair`). With FSDP the
    step adds only the parameters' all-gathers, in Auto and Explicit mode alike."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", COMM_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "single step ok" in r.stdout and "multi step ok" in r.stdout and "fuse ok" in r.stdout
    assert "auto fsdp ok" in r.stdout and "explicit fsdp ok" in r.stdout

