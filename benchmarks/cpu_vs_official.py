"""Our network against the official PyTorch UCMIMNet, in one process, on the same inputs.

    python benchmarks/cpu_vs_official.py --official-repo PATH [--batch 4 --crop 224 --steps 8 --rounds 3]

PATH is a clone or mirror (bare is fine) of github.com/erfect2020/DeFusion-plusplus. The network
files at `--commit` (default: the last commit that has `model/UCMIModel.py`) are extracted into a
temporary folder at run time and imported from there; nothing of it is stored in this repository.
Without `--official-repo` only our side is timed and the line says the official one is absent.
`--side official` / `--side ours` time one network in a process of its own (no second framework's
memory, threads or allocator traffic in between); run the two alternately and compare the lines.

Timed, warm-up excluded, median seconds per call over `--rounds` interleaved rounds of `--steps`
calls (official train, ours train, official eval, ours eval, repeated), so both sides see the same
machine load:

  train  official: model.train(), forward, the official `SelfTrainLoss` (loss/mix_fp_loss.py: 20 / 10
         / 10 L1, 100 L1 + 50 SSIM on the fused image, 2x MFM L1, summed over the batch), backward,
         Adam step, with torch.set_num_threads(--threads).
         ours: one jitted step of the trainer (defusion_jax.train's update: the pretrain task's
         loss_fn with the `official` recipe, optax Adam, gradient and parameter norms), which also
         draws the two degraded views on device (the official loader makes them in its workers, so
         this is extra work on our side). `--ours-step local` times model + losses + Adam on the
         given views instead; `standin` uses an L1-on-every-output loss (when defusion_jax.losses
         is unavailable). The JSON says which one ran.
  eval   official: model.eval() under torch.no_grad(), the full forward (all six outputs, MFM too).
         ours: the jitted deterministic forward with the same outputs (MFM included).

Both networks get the same random weights? No: both are freshly initialised (speed does not depend
on the values); both get the same images, masks and batch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path, flags)

OFFICIAL_COMMIT = "dee686cce06ad1df7dc836f6e7344eef683f4503"
OFFICIAL_FILES = {  # path in the official repository -> path in the import folder
    "model/UCMIModel.py": "models/UCMIModel.py",
    "model/tinymim.py": "models/tinymim.py",
    "model/vit.py": "models/vit.py",
    "model/multiAtten.py": "models/multiAtten.py",
    "model/pos_embed.py": "models/pos_embed.py",
    "utils/pos_embed.py": "utils/pos_embed.py",
    "loss/mix_fp_loss.py": "loss/mix_fp_loss.py",
}

# kornia is only needed for its SSIMLoss in the official loss file; when it is not installed this
# stand-in (same window, constants, reflect padding and clamp as kornia 0.7's SSIMLoss) is put on
# the import path under the same name.
KORNIA_STANDIN = '''
import torch
import torch.nn.functional as F

def _gauss(size, sigma):
    x = torch.arange(size, dtype=torch.float32) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-x.pow(2.0) / (2 * sigma ** 2))
    return g / g.sum()

def _blur(x, k):
    c, r = x.shape[1], k.numel() // 2
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

def ssim(img1, img2, window_size, max_val=1.0, eps=1e-12):
    k = _gauss(window_size, 1.5).to(img1)
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mu1, mu2 = _blur(img1, k), _blur(img2, k)
    s11 = _blur(img1 * img1, k) - mu1 ** 2
    s22 = _blur(img2 * img2, k) - mu2 ** 2
    s12 = _blur(img1 * img2, k) - mu1 * mu2
    num = (2 * mu1 * mu2 + c1) * (2 * s12 + c2)
    den = (mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2)
    return num / (den + eps)

class SSIMLoss(torch.nn.Module):
    def __init__(self, window_size, max_val=1.0, eps=1e-12, reduction="mean", padding="same"):
        super().__init__()
        self.window_size, self.max_val, self.eps = window_size, max_val, eps

    def forward(self, img1, img2):
        return torch.clamp((1.0 - ssim(img1, img2, self.window_size, self.max_val, self.eps)) / 2, 0, 1).mean()

def js_div_loss_2d(*args, **kwargs):
    raise NotImplementedError("kornia stand-in: js_div_loss_2d is not used by SelfTrainLoss.forward")
'''


class OfficialMissing(RuntimeError):
    pass


def extract_official(repo: str, commit: str, dest: Path) -> None:
    """Write the official network files at `commit` of `repo` under `dest` (models/, utils/, loss/)."""
    repo_path = Path(repo)
    if not repo_path.exists():
        raise OfficialMissing(f"--official-repo {repo}: no such folder")
    for src, dst in OFFICIAL_FILES.items():
        r = subprocess.run(["git", "-C", str(repo_path), "show", f"{commit}:{src}"], capture_output=True)
        if r.returncode != 0:
            raise OfficialMissing(f"--official-repo {repo}: cannot read {src} at commit {commit[:10]} "
                                  f"({r.stderr.decode(errors='replace').strip().splitlines()[-1:]}); pass a clone "
                                  "or mirror of erfect2020/DeFusion-plusplus with its history")
        out = dest / dst
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(r.stdout)
    for pkg in ("models", "utils", "loss"):
        (dest / pkg / "__init__.py").touch()
    try:
        import kornia  # noqa: F401
    except ImportError:
        (dest / "kornia").mkdir()
        (dest / "kornia" / "__init__.py").write_text("from . import losses\n")
        (dest / "kornia" / "losses.py").write_text(KORNIA_STANDIN)


def build_official(folder: Path, threads: int):
    import warnings

    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from loss.mix_fp_loss import SelfTrainLoss
        from models.UCMIModel import UCMIMNet
    import kornia

    torch.manual_seed(0)
    model = UCMIMNet()
    loss = SelfTrainLoss()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=4e-4, betas=(0.9, 0.999))
    ssim_from = "kornia " + getattr(kornia, "__version__", "?") if hasattr(kornia, "__version__") else \
        "kornia-equivalent SSIMLoss stand-in (kornia not installed)"
    return model, loss, opt, ssim_from


def make_inputs(batch: int, crop: int, seed: int = 0):
    """Clean images and the two degraded views with their masks (NHWC numpy, float32)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    # smooth-ish images so SSIM and L1 see realistic values; the content does not change speed
    base = rng.random((batch, crop // 8, crop // 8, 3), dtype=np.float32)
    clean = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)
    clean = np.clip(clean + 0.05 * rng.standard_normal(clean.shape, dtype=np.float32), 0, 1)
    try:
        from defusion_jax import views

        v = jax.device_get(jax.jit(views.make_views)(jax.random.key(seed), clean))
        v1, v2, m1, m2 = (np.array(v[k], np.float32) for k in ("view1", "view2", "mask1", "mask2"))
        m1 = m1.reshape(batch, crop, crop)
        m2 = m2.reshape(batch, crop, crop)
    except ImportError:
        m1 = (rng.random((batch, crop, crop)) < 0.6).astype(np.float32)
        m2 = np.maximum(1 - m1, (rng.random((batch, crop, crop)) < 0.3)).astype(np.float32)
        noise = np.abs(rng.standard_normal((2, batch, crop, crop, 3))).clip(0, 1).astype(np.float32)
        v1 = clean * m1[..., None] + noise[0] * (1 - m1[..., None])
        v2 = clean * m2[..., None] + noise[1] * (1 - m2[..., None])
    return {"clean": clean, "view1": v1, "view2": v2, "mask1": m1, "mask2": m2}  # masks (B, H, W)


# ---- our side -----------------------------------------------------------------------------------
def ours_train_step(kind: str, batch: int, crop: int, dtype: str, remat: bool):
    """(jitted step, state, batch maker, label) for the requested kind of step."""
    import jax
    import jax.numpy as jnp
    import optax

    if kind in ("auto", "trainer"):
        try:
            from configs.pretrain import get_config
            from defusion_jax import sharding as sh
            from defusion_jax import train as trainer
            from defusion_jax.tasks import get_task
        except ImportError as e:
            if kind == "trainer":
                raise
            print(f"trainer not importable ({e}); using the local step", file=sys.stderr)
            kind = "local"
        else:
            config = get_config("official,cud")
            config.batch_size, config.image_size = batch, crop
            config.compute_dtype = dtype
            config.remat = remat
            config.total_steps = 10**6
            mesh = sh.make_mesh(devices=jax.devices()[:1])
            task = get_task(config.task)(config, mesh)
            tx, lr_fn = trainer.build_optimizer(config)

            init_state, train_step = trainer.make_step_fns(task, tx, lr_fn)  # the trainer's own update
            state = jax.jit(init_state)(*jax.random.split(jax.random.key(0)))
            step = trainer.jit_train_step(train_step, mesh)  # the trainer's program, on one device
            label = ("trainer step (defusion_jax.train update, tasks.pretrain loss_fn, configs/pretrain.py:"
                     "official,cud; views drawn on device)")
            def call(st, b):
                return step(st, {}, {"image": b["clean"]})

            call.jitted, call.args = step, lambda st, b: (st, {}, {"image": b["clean"]})  # for profiling
            return call, state, label

    from defusion_jax.models.defusion import build_model, init_params

    model = build_model({"dtype": dtype, "vit": dict(
        variant="Ti-mim", eps=1e-6, drop_path=(0.1,) * 11 + (0.0,), posemb="sincos", remat=remat)})
    params = init_params(model, jax.random.key(0), (crop, crop))
    tx = optax.adam(4e-4, b1=0.9, b2=0.999)
    try:
        if kind == "standin":
            raise ImportError
        from defusion_jax import losses as L
        from defusion_jax.views import cud_targets
        recipe = L.get_recipe("official")

        def loss_fn(params, b, rng):
            kd, kdir, km = jax.random.split(rng, 3)
            direction = jax.random.bernoulli(kdir, 0.5, (b["view1"].shape[0],))
            out = model.apply({"params": params}, b["view1"], b["view2"], direction=direction, deterministic=False,
                              rngs={"dropout": kd, "mfm": km})
            terms = L.cud_loss_eq3(out, cud_targets(b["clean"], b["mask1"], b["mask2"]), b["clean"])
            terms["mfm"] = L.mfm_loss_eq8(out["mfm_recon"], b["clean"])
            return L.total_loss_eq9(terms, recipe, multimodal=False)

        label = "local step (DeFusionPP + defusion_jax.losses official recipe + optax Adam, given views)"
    except ImportError:
        def loss_fn(params, b, rng):
            kd, km = jax.random.split(rng)
            out = model.apply({"params": params}, b["view1"], b["view2"], deterministic=False,
                              rngs={"dropout": kd, "mfm": km})
            return sum(jnp.abs(out[k] - b["clean"]).mean() for k in ("common", "unique1", "unique2", "fused",
                                                                      "mfm_recon"))

        label = "STAND-IN step (DeFusionPP + L1 on every output + optax Adam, given views)"

    def train_step(state, b):
        rng = jax.random.fold_in(jax.random.key(1), state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], b, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}, loss

    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return jax.jit(train_step, donate_argnums=(0,)), state, label


def ours_eval_fn(dtype: str):
    import jax

    from defusion_jax.models.defusion import build_model, init_params

    model = build_model({"dtype": dtype})

    @jax.jit
    def forward(params, a, b, rng):
        return model.apply({"params": params}, a, b, rngs={"mfm": rng})

    return forward, model, init_params


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-repo", default=os.environ.get("DEFUSION_OFFICIAL_REPO"),
                    help="clone or mirror of erfect2020/DeFusion-plusplus ($DEFUSION_OFFICIAL_REPO)")
    ap.add_argument("--commit", default=OFFICIAL_COMMIT)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8, help="timed calls per round and side")
    ap.add_argument("--eval-steps", type=int, default=None, help="timed eval calls per round (default 2x --steps)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--ours-step", choices=("auto", "trainer", "local", "standin"), default="auto")
    ap.add_argument("--dtype", default="float32", help="our compute dtype (float32 or bfloat16)")
    ap.add_argument("--remat", action="store_true", help="rematerialise our encoder blocks")
    ap.add_argument("--precision", default=None, help="our matmul precision (jax.default_matmul_precision, e.g. "
                    "bfloat16: bfloat16 operands with float32 sums; default: JAX's, float32 on CPU)")
    ap.add_argument("--only", choices=("train", "eval", "both"), default="both")
    ap.add_argument("--xla-flags", default="", help="extra XLA flags for this process")
    ap.add_argument("--side", choices=("both", "official", "ours"), default="both",
                    help="time one network only (each in a process of its own, without the other's "
                         "memory and threads; compare the two JSON lines)")
    args = ap.parse_args(argv)
    eval_steps = args.eval_steps or 2 * args.steps

    flags = _common.set_xla_flags(args.xla_flags)
    record = {"benchmark": "cpu_vs_official", "batch": args.batch, "crop": args.crop, "loadavg_start": _common.loadavg()}

    if args.side == "official" and not args.official_repo:
        print("error: --side official needs --official-repo", file=sys.stderr)
        return 2
    official = None
    tmp = tempfile.TemporaryDirectory(prefix="defusion_official_")
    if args.official_repo and args.side != "ours":
        try:
            extract_official(args.official_repo, args.commit, Path(tmp.name))
            official = build_official(Path(tmp.name), args.threads)
        except OfficialMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.side == "both":
        _common.log("official network ABSENT: pass --official-repo PATH (clone or mirror of "
                    "erfect2020/DeFusion-plusplus) to time it; timing ours only")

    import jax
    import numpy as np

    _common.enable_compilation_cache()
    data = make_inputs(args.batch, args.crop)
    record.update(_common.host_info())
    record["xla_flags"] = flags

    timings: dict[str, list[float]] = {}
    plan = []  # (name, fn, sync, calls)
    record["precision"] = args.precision or "jax default"
    precision = lambda: (jax.default_matmul_precision(args.precision) if args.precision  # noqa: E731
                         else contextlib.nullcontext())

    if official is not None:
        import torch

        model_t, loss_t, opt_t, ssim_from = official
        nchw = lambda x: torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))  # noqa: E731
        t1, t2 = nchw(data["view1"]), nchw(data["view2"])
        gt = torch.cat([nchw(data["mask1"][..., None]), nchw(data["mask2"][..., None]), nchw(data["clean"]),
                        nchw(data["clean"])], 1)

        def torch_train():
            model_t.train()
            out = model_t(t1, t2)
            losses = loss_t(t1, t2, gt, *out)
            opt_t.zero_grad(set_to_none=True)
            losses["total_loss"].backward()
            opt_t.step()
            return None

        def torch_eval():
            model_t.eval()
            with torch.no_grad():
                return model_t(t1, t2)

        record.update({"official_commit": args.commit, "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads(), "official_ssim": ssim_from,
                       "official_params": sum(p.numel() for p in model_t.parameters() if p.requires_grad)})
        if args.only in ("train", "both"):
            plan.append(("official_train", torch_train, lambda r: None, args.steps))
    else:
        record["official"] = "not timed (--side ours)" if args.side == "ours" else "absent (no --official-repo)"
    ours = args.side != "official"
    record["side"] = args.side

    if ours and args.only in ("train", "both"):
        step, state, label = ours_train_step(args.ours_step, args.batch, args.crop, args.dtype, args.remat)
        record["ours_train_step"] = label
        jbatch = jax.device_put(data)
        holder = {"state": state}

        def ours_train():
            with precision():
                holder["state"], metrics = step(holder["state"], jbatch)
            return metrics

        plan.append(("ours_train", ours_train, jax.block_until_ready, args.steps))

    if args.only in ("eval", "both") and official is not None:
        plan.append(("official_eval", torch_eval, lambda r: None, eval_steps))
    if ours and args.only in ("eval", "both"):
        forward, model, init_params = ours_eval_fn(args.dtype)
        eparams = init_params(model, jax.random.key(0), (args.crop, args.crop))
        a, b = jax.device_put(data["view1"]), jax.device_put(data["view2"])
        counter = {"i": 0}

        def ours_eval():
            counter["i"] += 1
            with precision():
                return forward(eparams, a, b, jax.random.key(counter["i"]))

        plan.append(("ours_eval", ours_eval, jax.block_until_ready, eval_steps))

    # warm-up (compilation, allocator, lazy init), excluded
    for name, fn, sync, _ in plan:
        t0 = time.perf_counter()
        _common.time_calls(fn, args.warmup, sync)
        record[f"{name}_warmup_s"] = round(time.perf_counter() - t0, 2)
    counts = {}
    for r in range(args.rounds):
        for name, fn, sync, calls in plan:
            ts = _common.time_calls(fn, calls, sync, counts.setdefault(name, {}))
            timings.setdefault(name, []).extend(ts)
            _common.log(f"round {r} {name}: median {_common.median(ts) * 1e3:.1f} ms/call "
                        f"(load {_common.loadavg()})")

    for name, ts in timings.items():
        med = _common.median(ts)
        record[f"{name}_ms"] = round(med * 1e3, 2)
        record[f"{name}_pairs_per_s"] = round(args.batch / med, 3)
        record[f"{name}_spread"] = [round(min(ts) * 1e3, 1), round(max(ts) * 1e3, 1)]
        record.update(_common.per_call(counts[name], name))
    for kind in ("train", "eval"):
        if f"official_{kind}_ms" in record and f"ours_{kind}_ms" in record:
            record[f"speedup_{kind}"] = round(record[f"official_{kind}_ms"] / record[f"ours_{kind}_ms"], 3)
    record.update(_common.peak_memory())
    record["loadavg_end"] = _common.loadavg()
    _common.emit(record)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
