"""PyTorch -> Flax conversion for the official DeFusion++ network and for timm/MAE ViTs.

Our modules carry the PyTorch names, so conversion is one generic rule (no per-key table):
`a.b.3.c.weight` -> `a/b_3/c/kernel` (Linear (out,in) -> (in,out); Conv (O,I,kh,kw) -> (kh,kw,I,O))
or `.../scale` for 1-D LayerNorm weights; `in_proj_weight` -> `in_proj_kernel`. Fixed sin-cos
position tables are not parameters: they are checked against the table we compute and dropped.
The result is compared with the parameter tree the model expects, and any missing, unexpected or
mis-shaped key fails with one message listing them.

    python -m defusion_jax.convert official --input ucmimnet.pth --output DIR
    python -m defusion_jax.convert vit --input mae_pretrain_vit_base.pth --output DIR
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

from defusion_jax.params_io import CheckpointError, describe_mismatch, flatten, read_state_dict, save_params, unflatten

_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def flax_key(torch_key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Generic rename and re-layout of one PyTorch tensor."""
    path = _INDEX.sub(r"_\1", torch_key).split(".")
    leaf = path[-1]
    if leaf == "in_proj_weight":
        return "/".join(path[:-1] + ["in_proj_kernel"]), value.T
    if leaf == "weight":
        if value.ndim == 1:
            return "/".join(path[:-1] + ["scale"]), value
        if value.ndim == 2:
            return "/".join(path[:-1] + ["kernel"]), value.T
        if value.ndim == 4:
            return "/".join(path[:-1] + ["kernel"]), value.transpose(2, 3, 1, 0)
        raise CheckpointError(f"{torch_key}: cannot convert a {value.ndim}-D weight")
    return "/".join(path), value


def torch_key(flax_path: str) -> str:
    """Inverse of the rename (for messages and for the reverse converter)."""
    parts = flax_path.split("/")
    leaf = {"kernel": "weight", "scale": "weight", "in_proj_kernel": "in_proj_weight"}.get(parts[-1], parts[-1])
    return re.sub(r"_(\d+)(?=\.|$)", r".\1", ".".join(parts[:-1] + [leaf]))


def to_torch_layout(flat_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flax params (flat '/' keys) -> PyTorch names and layouts (exact inverse of `flax_key`)."""
    out = {}
    for k, v in flat_params.items():
        v = np.asarray(v)
        if k.endswith("/kernel") or k.endswith("/in_proj_kernel"):
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        out[torch_key(k)] = v
    return out


def convert_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                       fixed_tables: Mapping[str, np.ndarray] | None = None,
                       optional: Iterable[str] = (), source: str = "checkpoint") -> tuple[dict, list[str]]:
    """Convert and check against `expected` ({flax key: shape}).

    `fixed_tables` maps PyTorch keys of non-trained tables to the values we compute; they must
    agree to 1e-3 (float16 files round them) and are dropped. Keys matching a regex in `optional` are reported and
    skipped. Returns (flat params, notes).
    """
    fixed_tables = dict(fixed_tables or {})
    optional = [re.compile(p) for p in optional]
    flat, notes, unexpected, bad_shape, misshapen = {}, [], [], [], set()
    for k, v in state_dict.items():
        if k in fixed_tables:
            want = fixed_tables.pop(k)
            if v.shape != want.shape or np.max(np.abs(v - want)) > 1e-3:
                raise CheckpointError(f"{source}: {k} is not the fixed sin-cos table this model uses "
                                      f"(shape {v.shape}); cannot convert")
            continue
        if any(p.fullmatch(k) for p in optional):
            notes.append(f"skipped {k} {tuple(v.shape)}")
            continue
        fk, fv = flax_key(k, v)
        if fk not in expected:
            unexpected.append(k)
        elif tuple(fv.shape) != tuple(expected[fk]):
            bad_shape.append(f"{k} {tuple(v.shape)} (expected {tuple(expected[fk])} after re-layout)")
            misshapen.add(fk)
        else:
            flat[fk] = np.ascontiguousarray(fv, dtype=np.float32)
    missing = [torch_key(k) for k in expected if k not in flat and k not in misshapen]
    problem = describe_mismatch(missing, unexpected, bad_shape)
    if problem:
        raise CheckpointError(f"{source}: does not match the model: {problem}")
    return flat, notes


def expected_shapes(init_fn: Callable[[jax.Array], dict]) -> dict[str, tuple]:
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    return {k: tuple(v.shape) for k, v in flatten_shapes(shapes).items()}


def flatten_shapes(tree) -> dict:
    from flax import traverse_util

    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


# ---- the official DeFusion++ network ------------------------------------------------------------
TEACHER_PREFIXES = (r"model_encoder1\..*", r"model_encoder2\..*")


def official_model_config(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Model config of an official checkpoint: UCMIMNet, or MUCMIMNet when the LP heads exist."""
    return {"multimodal": any(k.startswith("latent_predict") for k in state_dict)}


def convert_official(state_dict: Mapping[str, np.ndarray], model_config: Mapping | None = None,
                     source: str = "checkpoint") -> tuple[dict, dict, list[str]]:
    """Official `UCMIMNet`/`MUCMIMNet` state dict -> (params, model_config, notes).

    The frozen MAE teachers that `MUCMIMNet` keeps inside its state dict (`model_encoder1/2.*`)
    are not part of the student: they are reported and skipped (convert them with `vit`).
    """
    from defusion_jax.models.defusion import build_model, init_params
    from defusion_jax.models.vit import sincos_table

    cfg = dict(official_model_config(state_dict) if model_config is None else model_config)
    model = build_model(cfg)
    expected = expected_shapes(lambda r: init_params(model, r))
    dim = model.dim
    tables = {"encoder.pos_embed": sincos_table(dim, 14, 14)[None], "decoder_pos_embed": sincos_table(dim, 14, 14)[None]}
    flat, notes = convert_state_dict(state_dict, expected, tables, TEACHER_PREFIXES, source)
    if any(n.startswith("skipped model_encoder") for n in notes):
        n_teacher = sum(n.startswith("skipped model_encoder") for n in notes)
        notes = [n for n in notes if not n.startswith("skipped model_encoder")]
        notes.append(f"skipped {n_teacher} tensors of the frozen MAE teachers (model_encoder1/2); "
                     "convert teachers with `python -m defusion_jax.convert vit`")
    return unflatten(flat), cfg, notes


def load_official(path, model_config: Mapping | None = None):
    sd = read_state_dict(path)
    return convert_official(sd, model_config, source=str(path))


# ---- CLI ------------------------------------------------------------------------------------------
def _save(output, params, cfg, meta):
    try:
        return save_params(output, params, cfg, meta)
    except OSError as e:  # --output on a file, or somewhere not writable
        raise CheckpointError(f"cannot write {output}: {e.strerror or e}") from None


def _cmd_official(args) -> int:
    params, cfg, notes = load_official(args.input)
    out = _save(args.output, params, cfg, {"source": str(args.input), "converter": "official"})
    for n in notes:
        print(f"note: {n}")
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    print(f"wrote {n:,} parameters to {out}")
    return 0


def _cmd_random(args) -> int:
    """Randomly initialised official network (for demos and tests only: it fuses nothing well)."""
    from defusion_jax.models.defusion import build_model, init_params

    cfg = {"multimodal": False}
    params = jax.jit(lambda r: init_params(build_model(cfg), r))(jax.random.key(args.seed))
    out = _save(args.output, jax.device_get(params), cfg,
                      {"source": f"random init, seed {args.seed}", "converter": "random",
                       "warning": "random weights: outputs are not meaningful"})
    print(f"wrote a RANDOMLY INITIALISED official network (seed {args.seed}) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m defusion_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("official", help="official DeFusion++ checkpoint -> project parameter folder")
    p.add_argument("--input", required=True, help=".pth (official wrapper or bare) or .safetensors")
    p.add_argument("--output", required=True, help="output folder (params.safetensors + model.json)")
    p.set_defaults(fn=_cmd_official)
    p = sub.add_parser("random", help="randomly initialised official network (demos only)")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_random)
    try:
        from defusion_jax import convert_vit
    except ImportError:
        convert_vit = None
    if convert_vit is not None:
        convert_vit.add_subparser(sub)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
