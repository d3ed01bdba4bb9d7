"""What every training config (`configs/*.py`) shares: argument parsing, the official encoder,
and the trainer's device, checkpoint and logging fields. Kept in the package (not in `configs/`)
so a config file loaded by path from anywhere can import it.
"""

from __future__ import annotations

from typing import Iterable

import ml_collections

# The official DeFusion++ encoder (TinyMIM ViT-T, 6 heads and 12 in the last block): what
# configs/pretrain.py trains and what the downstream configs fine-tune.
VIT_TI_MIM = dict(variant="Ti-mim", eps=1e-6, drop_path=(0.1,) * 11 + (0.0,), posemb="sincos")


def parse_args(arg: str | None, allowed: Iterable[str], config_file: str) -> set[str]:
    """The comma-separated arguments after ':' in `--config=FILE:ARGS`; unknown ones are an error."""
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = args - set(allowed)
    if unknown:
        raise ValueError(f"unknown config arguments {sorted(unknown)} (known: {', '.join(sorted(allowed))}); "
                         f"see {config_file}")
    return args


def pick_modality(args: set[str]) -> str:
    """'fused' (default), or 'ir' / 'vi' for the single-modality baselines of Tables 4 and 5."""
    modes = args & {"fused", "ir", "vi"}
    if len(modes) > 1:
        raise ValueError(f"pick one of fused / ir / vi, got {sorted(modes)}")
    return modes.pop() if modes else "fused"


def add_trainer_fields(c: ml_collections.ConfigDict, *, fsdp: bool, ckpt_every: int, log_every: int,
                       panel_every: int, eval_every: int = 0) -> ml_collections.ConfigDict:
    """Devices, checkpoints and logs as `defusion_jax.train` reads them (defaults for a real run)."""
    # ---- devices ------------------------------------------------------------------------------
    c.mesh = (("data", -1),)  # tuples, so `--config.mesh="(('data', -1),)"` can override them
    c.mesh_axis_types = "auto"  # 'auto' or 'explicit'
    c.sharding_rules = ((".*", "fsdp"),) if fsdp else ((".*", "replicate"),)
    c.fsdp_axis = "data"
    c.fsdp_min_size = 2**16  # fsdp: only tensors with at least this many elements are split

    # ---- checkpoints and logs -----------------------------------------------------------------
    c.ckpt_every = ckpt_every
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.resume = ""  # another run's workdir or checkpoint folder (full state), used if WORKDIR has none
    c.init = ""  # parameters only (workdir, converted folder or official .pth)
    c.log_every = log_every
    c.panel_every = panel_every
    c.panel_samples = 2
    c.eval_every = eval_every
    c.tensorboard = True
    c.fast_compile = False  # jax_disable_most_optimizations: ~2x quicker XLA compiles, slower steps
    return c
