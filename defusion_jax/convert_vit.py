"""timm / MAE / DeiT ViT checkpoints (PyTorch) -> this project's parameter folder.

    python -m defusion_jax.convert vit --input mae_pretrain_vit_base.pth --output teachers/mae_b16

The architecture is read from the tensor shapes: width from `patch_embed.proj.weight`, depth from
the `blocks.N` indices, MLP width from `fc1`. Shapes cannot tell the head count, so it comes from
timm's standard table (Ti 3, S 6, B 12, L 16) unless `--heads` says otherwise (TinyMIM's ViT-T:
`--heads 6,6,6,6,6,6,6,6,6,6,6,12`). Every block keeps torch's fused qkv layout (3, heads,
head_dim) on the output axis (see `defusion_jax.models.vit.Attention`), so the per-head split is a
reshape at run time rather than a re-layout here.

Position table: MAE ships a fixed 2-D sin-cos table. When the checkpoint's table is that table
(to 1e-5, or to float16 rounding for half-precision files) it is dropped and recomputed for any
input grid (`posemb='sincos'`); otherwise it is kept as a learned table, resampled bicubically
to the input grid at run time (as timm's `dynamic_img_size`), or once here with `--image-size`.
DeiT-3 style tables without a cls row get a zero cls row, which computes the same function.

`fc_norm` and `head` (classifier extras), and the decoder of MAE's `*_full.pth` files, are
reported and skipped; any other unknown, missing or mis-shaped key fails with one message.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from defusion_jax.convert import convert_state_dict, expected_shapes
from defusion_jax.params_io import CheckpointError, flatten, read_state_dict, save_params, unflatten

# timm's head counts per width for patch-16 ViTs (vit_tiny/small/base/large_patch16_224).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16}
OPTIONAL = (r"fc_norm\.(weight|bias)", r"head\.(weight|bias)")
MAE_DECODER = (r"mask_token", r"decoder_.*")
SINCOS_EXACT = 1e-5
SINCOS_HALF = 1e-3  # float16 rounds values in [-1, 1] by at most 2.5e-4
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _variant_name(width: int, depth: int, mlp_dim: int, heads: tuple[int, ...]) -> str | None:
    from defusion_jax.models.vit import VARIANTS, as_heads

    for name, v in VARIANTS.items():
        if (v["width"], v["depth"], v["mlp_dim"]) == (width, depth, mlp_dim) and \
                as_heads(v["heads"], v["depth"]) == heads:
            return name
    return None


def parse_heads(text: str | int | Sequence[int] | None) -> int | tuple[int, ...] | None:
    """'12' -> 12, '6,6,12' -> (6, 6, 12)."""
    if text is None or isinstance(text, int):
        return text
    if not isinstance(text, str):
        return tuple(int(h) for h in text)
    try:
        vals = tuple(int(h) for h in text.split(","))
    except ValueError:
        raise CheckpointError(f"--heads must be an integer or a comma-separated list, got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _square_side(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n and s > 0 else None


def infer_config(sd: Mapping[str, np.ndarray], heads=None, eps: float = 1e-6,
                 source: str = "checkpoint") -> dict:
    """ViT config (width, depth, heads, mlp_dim, patch, eps) read from the tensor shapes."""
    from defusion_jax.models.vit import as_heads

    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        sample = sorted(sd)[:8]
        raise CheckpointError(f"{source}: no 4-D patch_embed.proj.weight, so not a timm/MAE/DeiT ViT "
                              f"(first keys: {sample})")
    width, in_ch, ph, pw = w.shape
    if (ph, pw) != (16, 16) or in_ch != 3:
        raise CheckpointError(f"{source}: patch embedding is {in_ch}x{ph}x{pw}; only RGB patch-16 ViTs "
                              "are supported")
    blocks = {int(m.group(1)) for k in sd for m in [_BLOCK.match(k)] if m}
    if not blocks:
        raise CheckpointError(f"{source}: no blocks.N.* tensors found")
    depth = max(blocks) + 1
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is None or fc1.ndim != 2:
        raise CheckpointError(f"{source}: missing keys ['blocks.0.mlp.fc1.weight']")
    mlp_dim = int(fc1.shape[0])
    heads = parse_heads(heads)
    if heads is None:
        if width not in STANDARD_HEADS:
            raise CheckpointError(f"{source}: width {width} is not a standard ViT width "
                                  f"{sorted(STANDARD_HEADS)}; pass the head count (--heads)")
        heads = STANDARD_HEADS[width]
    try:
        heads_t = as_heads(heads, depth)
    except ValueError as e:
        raise CheckpointError(f"{source}: --heads: {e}") from None
    if any(width % h for h in heads_t):
        raise CheckpointError(f"{source}: width {width} is not divisible by the head counts {heads}")
    cfg = {}
    name = _variant_name(int(width), depth, mlp_dim, heads_t)
    if name is not None:
        cfg["variant"] = name
    cfg.update(width=int(width), depth=depth, heads=heads if isinstance(heads, int) else list(heads_t),
               mlp_dim=mlp_dim, patch=16, eps=float(eps))
    return cfg


def _position_table(sd: dict, width: int, posemb: str, source: str) -> tuple[str, tuple[int, int], list[str]]:
    """Decide 'sincos' or 'learned' and normalise `sd['pos_embed']` to (1, 1 + g*g, width) in place."""
    from defusion_jax.models.vit import sincos_table

    notes = []
    pe = sd.get("pos_embed")
    if pe is None:
        raise CheckpointError(f"{source}: missing keys ['pos_embed'] (ViTs without an absolute position "
                              "table are not supported)")
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != width:
        raise CheckpointError(f"{source}: wrong shapes ['pos_embed {tuple(pe.shape)} (expected (1, N, {width}))']")
    n = pe.shape[1]
    g = _square_side(n - 1)
    if g is None and _square_side(n) is not None:  # no_embed_class (DeiT-3): cls gets no position
        g = _square_side(n)
        pe = np.concatenate([np.zeros((1, 1, width), pe.dtype), pe], axis=1)
        notes.append(f"pos_embed has no cls row ({n} = {g}x{g}); added a zero row (same function)")
    if g is None:
        raise CheckpointError(f"{source}: pos_embed has {n} rows, not 1 + a square grid")
    sd["pos_embed"] = pe
    if posemb not in ("auto", "sincos", "learned"):
        raise CheckpointError(f"posemb must be auto, sincos or learned, got {posemb!r}")
    if posemb == "learned":
        return "learned", (g, g), notes
    diff = float(np.max(np.abs(pe[0] - sincos_table(width, g, g))))
    if diff <= SINCOS_EXACT:
        notes.append(f"pos_embed is MAE's fixed sin-cos table (max diff {diff:.1e}); recomputed for any grid")
        return "sincos", (g, g), notes
    if diff <= SINCOS_HALF:
        notes.append(f"pos_embed is MAE's fixed sin-cos table up to float16 rounding (max diff {diff:.1e}); "
                     "using the exact table")
        return "sincos", (g, g), notes
    if posemb == "sincos":
        raise CheckpointError(f"{source}: pos_embed is not the fixed sin-cos table (max diff {diff:.3g}); "
                              "use --posemb learned or auto")
    return "learned", (g, g), notes


def convert_vit(state_dict: Mapping[str, np.ndarray], heads=None, eps: float = 1e-6, posemb: str = "auto",
                image_size: Sequence[int] | None = None, normalize: bool = True,
                source: str = "checkpoint") -> tuple[dict, dict, list[str]]:
    """timm/MAE/DeiT ViT state dict -> (params, model_config, notes).

    `model_config` builds the module with `defusion_jax.models.vit.vit_from_config`; `normalize`
    is stored in it (True: the module takes [0,1] images and applies ImageNet normalisation).
    `image_size` (H, W) resamples a learned table once, to that input size's grid.
    """
    from defusion_jax.models.vit import resample_table, vit_from_config

    sd = dict(state_dict)
    cfg = infer_config(sd, heads, eps, source)
    if "dist_token" in sd:  # its extra position row would otherwise read as "not 1 + a square grid"
        raise CheckpointError(f"{source}: has a dist_token (a distilled DeiT, e.g. deit_base_distilled_patch16_224: "
                              "cls + distillation token); only ViTs with one cls token convert, e.g. the "
                              "non-distilled deit_base_patch16_224")
    kind, grid, notes = _position_table(sd, cfg["width"], posemb, source)
    skipped_decoder = [k for k in sd if any(re.fullmatch(p, k) for p in MAE_DECODER)]
    for k in skipped_decoder:
        del sd[k]
    if skipped_decoder:
        notes.append(f"skipped {len(skipped_decoder)} tensors of the MAE decoder (mask_token, decoder_*)")
    if kind == "sincos":
        del sd["pos_embed"]
    elif image_size is not None:
        h, w = (int(s) for s in image_size)
        if h % 16 or w % 16:
            raise CheckpointError(f"--image-size {h} {w} is not a multiple of 16")
        new = (h // 16, w // 16)
        if new != grid:
            sd["pos_embed"] = np.asarray(resample_table(jnp.asarray(sd["pos_embed"][0]), grid, new))[None]
            notes.append(f"resampled the learned pos_embed from {grid[0]}x{grid[1]} to {new[0]}x{new[1]}")
            grid = new
    cfg.update(posemb=kind, posemb_grid=list(grid), normalize=bool(normalize))
    module = vit_from_config(cfg)
    x = jnp.zeros((1, 16 * grid[0], 16 * grid[1], 3), jnp.float32)
    expected = expected_shapes(lambda r: module.init(r, x)["params"])
    flat, more = convert_state_dict(sd, expected, None, OPTIONAL, source)
    return unflatten(flat), cfg, notes + more


def load_checkpoint(path, **kwargs) -> tuple[dict, dict, list[str]]:
    """Read and convert a `.pth`/`.safetensors` ViT checkpoint (see `convert_vit`)."""
    return convert_vit(read_state_dict(path), source=str(path), **kwargs)


# ---- CLI (a subcommand of `python -m defusion_jax.convert`) ---------------------------------------
def _cmd_vit(args) -> int:
    params, cfg, notes = load_checkpoint(args.input, heads=args.heads, eps=args.eps, posemb=args.posemb,
                                         image_size=args.image_size)
    try:
        out = save_params(args.output, params, cfg, {"source": str(args.input), "converter": "vit"})
    except OSError as e:
        raise CheckpointError(f"cannot write {args.output}: {e.strerror or e}") from None
    for n in notes:
        print(f"note: {n}")
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    desc = cfg.get("variant", f"width {cfg['width']}")
    print(f"wrote ViT-{desc} ({cfg['depth']} blocks, heads {cfg['heads']}, posemb {cfg['posemb']}) "
          f"with {n:,} parameters to {Path(out)}")
    return 0


def add_subparser(sub) -> None:
    p = sub.add_parser("vit", help="timm / MAE / DeiT ViT checkpoint -> project parameter folder (a teacher)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help=".pth (bare or {'model': ...}) or .safetensors; fp32 or fp16")
    p.add_argument("--output", required=True, help="output folder (params.safetensors + model.json)")
    p.add_argument("--heads", default=None,
                   help="attention heads (shapes cannot tell): an int, or one per block comma-separated; "
                        "default: timm's table by width (192:3, 384:6, 768:12, 1024:16)")
    p.add_argument("--eps", type=float, default=1e-6, help="LayerNorm epsilon (timm/MAE/DeiT: 1e-6)")
    p.add_argument("--posemb", choices=("auto", "sincos", "learned"), default="auto",
                   help="position table: auto detects MAE's fixed sin-cos table")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="resample a learned position table once to this input size")
    p.set_defaults(fn=_cmd_vit)
