"""Processes, devices, mesh and shardings for training (one CPU up to a TPU pod).

- `maybe_initialize_distributed()` starts `jax.distributed` only when the environment says the job
  has several processes (explicit DEFUSION_* variables, Slurm with more than one task, a multi-host
  Cloud TPU); it must run before anything touches a device.
- `make_mesh(config.mesh, config.mesh_axis_types)` builds the mesh with explicit axis types.
- Parameters and optimiser state are placed by regex rules: `replicate` or `fsdp` (split the largest
  divisible dimension over the data axis, for tensors above a size threshold).
- The batch is sharded over every mesh axis except model-parallel ones (`model`, `tensor`).
"""

from __future__ import annotations

import collections
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding

P = jax.P
MODEL_AXES = ("model", "tensor")  # never used for the batch

ENV_COORDINATOR = "DEFUSION_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "DEFUSION_NUM_PROCESSES"
ENV_PROCESS_ID = "DEFUSION_PROCESS_ID"
ENV_LOCAL_DEVICES = "DEFUSION_LOCAL_DEVICE_IDS"  # optional, comma separated


# ---- processes ---------------------------------------------------------------------------------
def distributed_request(environ=None) -> dict | None:
    """How (and whether) to call `jax.distributed.initialize`, from the environment.

    Returns None for a single-process job, else the keyword arguments ({} = let JAX detect the
    cluster: Slurm, Cloud TPU pods, ...).
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_COORDINATOR):
        missing = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(k)]
        if missing:
            raise ValueError(f"{ENV_COORDINATOR} is set but {', '.join(missing)} is not")
        kw = dict(coordinator_address=env[ENV_COORDINATOR], num_processes=int(env[ENV_NUM_PROCESSES]),
                  process_id=int(env[ENV_PROCESS_ID]))
        if env.get(ENV_LOCAL_DEVICES):
            kw["local_device_ids"] = [int(i) for i in env[ENV_LOCAL_DEVICES].split(",")]
        return kw
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return {}
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1 or int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
        return {}
    return None


def maybe_initialize_distributed(environ=None) -> bool:
    """Initialise `jax.distributed` when the job is multi-process; True when it did (or was)."""
    if jax.distributed.is_initialized():
        return True
    kw = distributed_request(environ)
    if kw is None:
        return False
    logging.info("starting jax.distributed with %s", kw or "cluster auto-detection")
    jax.distributed.initialize(**kw)
    return True


def log_topology() -> None:
    """Every process says who it is and which devices it holds (big_vision's hello line)."""
    logging.info("process %d/%d on %s holds %d of %d devices: %s", jax.process_index(), jax.process_count(),
                 jax.default_backend(), jax.local_device_count(), jax.device_count(),
                 ", ".join(str(d) for d in jax.local_devices()))


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """Barrier through the jax.distributed coordinator (not a device collective); no-op alone.

    For after ahead-of-time compilation, where processes can finish minutes apart (one hits the
    compilation cache, one does not). Seen with two pinned CPU processes: the first step's gloo
    context setup failed with a 30 s GetKeyValue timeout while the other process still compiled
    (`benchmarks/train_step.py`; an idle peer, e.g. one sleeping 100 s, did not trigger it)."""
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp

        ocp.multihost.sync_global_processes(name, timeout=timeout_s, processes=set(range(jax.process_count())))


# ---- mesh --------------------------------------------------------------------------------------
def make_mesh(axes: Sequence[Sequence[Any]] = (("data", -1),), axis_types: str = "auto",
              devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """Mesh from `[(name, size), ...]`; one size may be -1 (fill with the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(axes, str) or not all(isinstance(a, (tuple, list)) and len(a) == 2 for a in axes):
        # e.g. --config.mesh=((data,-1),): unquoted names do not parse as Python and stay a string
        raise ValueError(f"expected (name, size) pairs such as --config.mesh=\"(('data', -1),)\" (names quoted), "
                         f"got {axes!r}")
    names = [str(a[0]) for a in axes]
    sizes = [int(a[1]) for a in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {list(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {list(axes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    kinds = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
    if axis_types not in kinds:
        raise ValueError(f"mesh_axis_types must be 'auto' or 'explicit', got {axis_types!r}")
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(kinds[axis_types],) * len(names),
                         devices=devices)


def batch_axes(mesh) -> tuple[str, ...]:
    return tuple(n for n in mesh.axis_names if n not in MODEL_AXES)


def batch_spec(mesh, ndim: int = 1) -> jax.sharding.PartitionSpec:
    return P(batch_axes(mesh), *([None] * (ndim - 1)))


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, ndim))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_per_device(mesh, global_batch: int) -> int:
    n = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    if global_batch % n:
        raise ValueError(f"batch size {global_batch} does not divide over the {n} data-parallel devices "
                         f"(mesh {dict(mesh.shape)}); use a multiple of {n}")
    return global_batch // n


def process_rows(global_size: int) -> slice:
    """This process's rows of a host-side global batch: equal consecutive blocks in process order,
    the layout `data.pipeline.BatchBlockShard` feeds and `global_batch` assembles."""
    per = global_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def global_batch(batch, mesh):
    """This process's rows -> global jax.Arrays sharded over the batch axes (every leaf on its
    leading axis): the trainer's input placement, used by the evaluations and benchmarks too."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x), batch)


# ---- activations under a mesh ------------------------------------------------------------------
# The models run unchanged under Auto (the default) and Explicit axis types. In Explicit mode a
# sharding is part of an array's type: newly made arrays (random draws, broadcasts) come out
# replicated, mixing them with batch-sharded ones is a type error, and most reshapes and slices of
# a sharded axis need their output placement spelled out. These helpers say it once; outside
# Explicit mode they are the plain operation (shard_batch and gather_params also constrain Auto mode).
def is_explicit(mesh=None) -> bool:
    """Whether the mesh (default: the one in context) has Explicit axis types."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return not mesh.empty and all(t == AxisType.Explicit for t in mesh.axis_types)


def _ways(mesh, entry) -> int:
    """Into how many parts a PartitionSpec entry (None, a name or a tuple of names) splits an axis."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[a] for a in names)


def batch_out_sharding(shape: Sequence[int]) -> dict:
    """`out_sharding=` for a new array with a batch-leading `shape` in Explicit mode: the batch
    sharding of the mesh in context, or nothing (replicated) when the batch does not divide over it."""
    mesh = jax.sharding.get_abstract_mesh()
    if not is_explicit(mesh) or shape[0] % _ways(mesh, batch_axes(mesh)):
        return {}
    return {"out_sharding": batch_spec(mesh, len(shape))}


def shard_batch(x: jax.Array) -> jax.Array:
    """Constrain the leading axis of `x` to the batch sharding of the mesh in context (no-op without).

    In Explicit mode array-creating ops come out replicated unless told otherwise, in Auto mode XLA
    may choose to replicate; either way generated per-sample data must stay with its samples.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if is_explicit(mesh):
        out = batch_out_sharding(x.shape)
        return jax.sharding.reshard(x, out["out_sharding"]) if out else x
    return jax.lax.with_sharding_constraint(x, batch_spec(mesh, x.ndim))


def like_batch(like: jax.Array, ndim: int) -> dict:
    """`out_sharding=` for a new array of `ndim` dimensions whose leading axis is placed like
    `like`'s (Explicit mode only)."""
    if not is_explicit():
        return {}
    lead = jax.typeof(like).sharding.spec
    return {"out_sharding": P(lead[0] if len(lead) else None, *([None] * (ndim - 1)))}


def broadcast_batch(x: jax.Array, shape: Sequence[int], like: jax.Array) -> jax.Array:
    """`jnp.broadcast_to(x, shape)` with the leading (batch) axis placed like `like`'s."""
    return jnp.broadcast_to(x, shape, **like_batch(like, len(shape)))


def reshape_batch(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """`x.reshape(shape)` for a reshape that keeps the leading (batch) axis, e.g. a token axis
    split into a grid, whose output placement Explicit mode cannot infer."""
    return jnp.reshape(x, shape, **like_batch(x, len(shape)))


def batch_bernoulli(key: jax.Array, p: float, shape: Sequence[int], like: jax.Array) -> jax.Array:
    """`jax.random.bernoulli` of a batch-leading shape, drawn where `like`'s rows live (dropout and
    drop-path masks). threefry is partitionable, so the values do not depend on the placement."""
    return jax.random.bernoulli(key, p, tuple(shape), **like_batch(like, len(shape)))


def vmap_batch(fn):
    """`jax.vmap(fn)` over the batch axis, for per-sample code (detection's proposals, NMS, RoI
    sampling). In Explicit mode it is traced in Auto mode (`jax.sharding.auto_axes`) and its outputs
    are placed on the batch sharding: JAX 0.10 cannot trace a vmapped `while_loop` or scatter under
    Explicit types, and the per-sample code needs no cross-sample placement of its own."""
    mapped = jax.vmap(fn)

    def run(*args):
        if not is_explicit():
            return mapped(*args)
        spec = batch_out_sharding(jax.tree.leaves(args)[0].shape[:1]).get("out_sharding", P())
        return jax.sharding.auto_axes(mapped, out_sharding=spec)(*args)

    return run


def first_rows(x: jax.Array, n: int) -> jax.Array:
    """`x[:n]` of a batch-sharded array. Explicit mode refuses a slice of a sharded axis that does
    not divide over its devices, so the rows are first gathered, from as few shards as cover them."""
    if not is_explicit() or not x.ndim:
        return x[:n]
    spec = jax.typeof(x).sharding.spec
    ways = _ways(jax.sharding.get_abstract_mesh(), spec[0] if len(spec) else None)
    cover = min(x.shape[0], -(-n // ways) * ways)
    return jax.sharding.reshard(x[:cover], P())[:n]


def gather_params(tree):
    """Parameters gathered whole where the step uses them: FSDP's all-gather before the forward,
    whose transpose in the gradient reduces and splits the gradients again. A no-op for replicated
    parameters and without a mesh.

    Explicit mode needs it (it will not run a matmul whose weight is split over the axis that splits
    the batch). In Auto mode it is a constraint XLA would not find alone: without it the FSDP step of
    the ViT-T student on 2 devices compiled to 166 all-gathers, 88 collective-permutes, 24
    all-to-alls and 32 all-reduces, moving activations; with it, to one all-gather per split
    parameter and the gradient all-reduces (docs/scaling.md)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return tree
    if is_explicit(mesh):
        return jax.tree.map(lambda x: jax.sharding.reshard(x, P()) if any(jax.typeof(x).sharding.spec) else x,
                            tree)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), tree)


_COLLECTIVE = re.compile(r"[ )}] (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(?:-start)?\(")


def collectives(compiled) -> dict[str, int]:
    """Cross-device operations in a compiled program (`jit(f).lower(...).compile()` or its
    `as_text()`), by kind: how a step's communication is checked rather than assumed."""
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    return dict(collections.Counter(m.group(1) for m in _COLLECTIVE.finditer(text)))


# ---- parameter placement -----------------------------------------------------------------------
def path_name(path) -> str:
    """'encoder/blocks_0/attn/qkv/kernel' for a pytree key path (optimiser states included)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], axis: str, axis_size: int, min_size: int) -> jax.sharding.PartitionSpec:
    """Split the largest dimension divisible by the axis size; small or indivisible stays replicated."""
    if axis_size <= 1 or int(np.prod(shape)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % axis_size == 0:
            spec = [None] * len(shape)
            spec[i] = axis
            return P(*spec)
    return P()


def tree_shardings(tree, mesh, rules: Sequence[Sequence[str]] = ((".*", "replicate"),),
                   fsdp_axis: str = "data", fsdp_min_size: int = 2**16):
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by regex rules.

    `rules` is a list of (regex, tactic); the first regex that `re.search`es the leaf's path wins,
    so the same rules place parameters and the optimiser moments that mirror them. Tactics:
    'replicate', 'fsdp'. Leaves no rule matches are replicated.
    """
    compiled = [(re.compile(r), t) for r, t in rules]
    for _, t in compiled:
        if t not in ("replicate", "fsdp"):
            raise ValueError(f"unknown sharding tactic {t!r} (known: 'replicate', 'fsdp')")
    size = mesh.shape.get(fsdp_axis, 1)

    def place(path, leaf):
        name = path_name(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for rx, tactic in compiled:
            if rx.search(name):
                if tactic == "fsdp" and shape:
                    return NamedSharding(mesh, fsdp_spec(shape, fsdp_axis, size, fsdp_min_size))
                return NamedSharding(mesh, P())
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(place, tree)


def describe_shardings(tree, shardings, limit: int = 40) -> list[str]:
    """Readable 'path shape spec' lines for the sharded leaves (logged once at start)."""
    lines = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), s in zip(flat, flat_s):
        if any(a is not None for a in s.spec):
            lines.append(f"{path_name(path)} {tuple(leaf.shape)} {s.spec}")
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])
