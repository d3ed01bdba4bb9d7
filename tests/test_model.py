"""Network facts the fixture cannot show: parameter counts, position tables for any grid, the
attention semantics of both CA modes, balanced MFM sampling, converter error messages."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defusion_jax.convert import convert_official, flax_key, to_torch_layout
from defusion_jax.models.cross_attention import CABlock, CrossAttentionTask
from defusion_jax.models.defusion import build_model, gather_tokens, init_params, mfm_masking, patchify, unpatchify
from defusion_jax.models.vit import masking_from_noise, sincos_table, softmax_attention
from defusion_jax.params_io import CheckpointError, flatten


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_counts_match_official():
    shapes = jax.eval_shape(lambda r: init_params(build_model(), r), jax.random.key(0))
    assert _count(shapes["encoder"]) == 5_486_592
    assert _count(shapes) == 13_420_800
    mm = jax.eval_shape(lambda r: init_params(build_model({"multimodal": True}), r), jax.random.key(0))
    # Two LP heads 192->768 and two affine LayerNorms; the common LayerNorm has no parameters.
    assert _count(mm) - _count(shapes) == 2 * (192 * 768 + 768) + 2 * 2 * 192
    assert "mm_common_norm" not in mm


@pytest.mark.parametrize("shape", [(2, 16, 9, 12), (1, 3, 7, 32)])
def test_softmax_attention_value_and_gradient_match_plain_softmax(shape):
    """The CPU attention's hand-written backward against autodiff of the textbook formula, with
    logits large enough that the max shift matters."""
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(3 * rng.standard_normal(shape), jnp.float32) for _ in range(4))

    def plain(q, k, v):
        return jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(shape[-1]), axis=-1) @ v

    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(softmax_attention, q, k, v)
        want, vjp_want = jax.vjp(plain, q, k, v)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
        for name, got, ref in zip("qkv", vjp(g), vjp_want(g)):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_attention_at_bfloat16_precision_rounds_its_operands_on_every_path(backend, monkeypatch):
    """Under precision "bfloat16" `attention` computes the attention of bfloat16-rounded q, k, v
    (float32 out) on the CPU path (`softmax_attention`) and on the accelerator path
    (`jax.nn.dot_product_attention`, taken here by reporting a GPU; cuDNN is absent, so XLA's):
    nearer that than the float32 result is. XLA alone would give the float32 result on both."""
    from defusion_jax.models import vit

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(2 * rng.standard_normal((2, 3, 9, 16)), jnp.float32) for _ in range(3))

    def run(precision):  # a new function each time: jit's cache does not know the backend was swapped
        with jax.default_matmul_precision(precision):
            out = jax.jit(lambda *a: vit.attention(*a))(q, k, v)
        assert out.dtype == jnp.float32
        return np.asarray(out, np.float64)

    def textbook(q, k, v):
        q, k, v = (np.asarray(t.astype(jnp.bfloat16).astype(jnp.float32), np.float64) for t in (q, k, v))
        logits = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v

    want = textbook(q, k, v)
    low, high = run("bfloat16"), run("highest")
    assert np.abs(low - want).max() < 0.75 * np.abs(high - want).max(), (np.abs(low - want).max(),
                                                                          np.abs(high - want).max())


def test_sincos_table_non_square_grid_by_hand():
    d, gh, gw = 16, 3, 5
    t = sincos_table(d, gh, gw)
    assert t.shape == (1 + gh * gw, d) and np.all(t[0] == 0)
    omega = [1.0 / 10000 ** (i / 4) for i in range(4)]  # d/4 frequencies per axis
    for r in range(gh):
        for c in range(gw):
            tok = t[1 + r * gw + c]  # row-major tokens
            want = ([math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega]  # columns first
                    + [math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega])
            np.testing.assert_allclose(tok, want, atol=1e-6)
    # The square case is MAE's table, and the transposed grid is a different table.
    assert not np.allclose(sincos_table(d, gw, gh)[1:6], t[1:6])


def test_non_square_input_runs_and_keeps_size():
    cfg = {"vit": dict(width=32, depth=2, heads=2, mlp_dim=64), "dim": 32, "heads": 4}
    model = build_model(cfg)
    params = jax.jit(lambda r: init_params(model, r, (32, 48)))(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (1, 48, 80, 3))
    out = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b, mfm=True, rngs={"mfm": jax.random.key(2)}))(
        params, x, x[:, ::-1])
    for k in ("common", "unique1", "unique2", "fused", "mfm_recon"):
        assert out[k].shape == (1, 48, 80, 3), k
    assert out["ids_keep"].shape == (1, int(15 * 0.25))


def _identity_cross_attention(d):
    eye = np.eye(d, dtype=np.float32)
    dense = {"kernel": eye, "bias": np.zeros(d, np.float32)}
    return {"query": dense, "key": dense, "value": dense,
            "multihead_attn": {"in_proj_kernel": np.concatenate([eye, eye, eye], 1),
                               "in_proj_bias": np.zeros(3 * d, np.float32), "out_proj": dense}}


@pytest.mark.parametrize("common", [True, False])
def test_cross_attention_modes_on_hand_made_inputs(common):
    d = 4
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(1, 5, d)).astype(np.float32)
    x2 = rng.normal(size=(1, 5, d)).astype(np.float32)
    out = CrossAttentionTask(num_heads=1, common=common).apply({"params": _identity_cross_attention(d)}, x1, x2)
    q, v = x2[0], x1[0]
    k = x2[0] if common else x1[0]  # Eq. 4: softmax(Q2 K2^T) V1;  Eq. 6: softmax(Q2 K1^T) V1
    logits = q @ k.T / math.sqrt(d)
    attn = np.exp(logits - logits.max(1, keepdims=True))
    attn /= attn.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out[0]), attn @ v, rtol=1e-5, atol=1e-6)


def test_ca_block_residual_is_on_the_query_side():
    block = CABlock(num_heads=2, common=False, mlp_dim=8)
    x1 = jnp.ones((1, 3, 4))
    x2 = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4)
    params = jax.eval_shape(block.init, jax.random.key(0), x1, x2)["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape), params)  # attention and FFN now contribute nothing
    params["norm1"]["scale"] = jnp.ones(4)
    params["norm2"]["scale"] = jnp.ones(4)
    out = block.apply({"params": params}, x1, x2)
    ln = lambda y: (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-5)  # noqa: E731
    np.testing.assert_allclose(out, ln(ln(x2)), atol=1e-5)


def test_mfm_masking_is_a_balanced_permutation(fixture_dir):
    with np.load(fixture_dir / "io.npz") as io:
        keep, restore, _ = masking_from_noise(jnp.asarray(io["mfm_noise"]), 0.75)
        np.testing.assert_array_equal(keep, io["mfm_ids_keep"])
        np.testing.assert_array_equal(restore, io["mfm_ids_restore"])
    keep, restore = mfm_masking(jax.random.key(0), 3, 196, 0.75)
    assert keep.shape == (3, 49)
    for row_keep, row_restore in zip(np.asarray(keep), np.asarray(restore)):
        assert len(set(row_keep)) == 49
        shuffle = np.argsort(row_restore)
        np.testing.assert_array_equal(shuffle[:49], row_keep)
    # Balanced sampling: every category keeps the same positions (cls first).
    pos = jnp.arange(197, dtype=jnp.float32)[None, :, None]
    categories = [pos + 1000 * i for i in range(6)]
    kept = [np.asarray(gather_tokens(jnp.broadcast_to(c, (3, 197, 1)), keep))[..., 0] - 1000 * i
            for i, c in enumerate(categories)]
    for k in kept[1:]:
        np.testing.assert_array_equal(k, kept[0])
    np.testing.assert_array_equal(kept[0][:, 0], 0)
    np.testing.assert_array_equal(kept[0][:, 1:], np.asarray(keep) + 1)


def test_patchify_roundtrip_and_official_vector_order():
    x = jnp.arange(2 * 32 * 48 * 3, dtype=jnp.float32).reshape(2, 32, 48, 3)
    tokens = patchify(x)
    np.testing.assert_array_equal(unpatchify(tokens, 2, 3), x)
    # token (row 1, col 2), vector index (p=3, q=5, c=1) lands at pixel (16 + 3, 32 + 5), channel 1
    assert tokens[0, 1 * 3 + 2, (3 * 16 + 5) * 3 + 1] == x[0, 19, 37, 1]


@pytest.fixture(scope="module")
def official_sd(fixture_dir):
    from safetensors.numpy import load_file

    return load_file(str(fixture_dir / "ucmimnet_state_dict.safetensors"))


def test_converter_lists_missing_and_unexpected_keys(official_sd):
    sd = dict(official_sd)
    del sd["decoder_fuse_skipconn.linear1.bias"]
    sd["decoder_extra.weight"] = np.zeros((3, 3), np.float32)
    sd["mask_token"] = np.zeros((1, 1, 191), np.float32)
    with pytest.raises(CheckpointError) as e:
        convert_official(sd)
    msg = str(e.value)
    assert "\n" not in msg
    assert "decoder_fuse_skipconn.linear1.bias" in msg and "decoder_extra.weight" in msg
    assert "mask_token" in msg and "wrong shapes" in msg


def test_converter_round_trip_half_precision_and_prefixes(official_sd):
    params, cfg, notes = convert_official(official_sd)
    assert cfg == {"multimodal": False} and notes == []
    back = to_torch_layout(flatten(params))
    assert set(back) == set(official_sd) - {"encoder.pos_embed", "decoder_pos_embed"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, official_sd[k])
    # float16 is upcast; DataParallel's module. prefix is accepted by read_state_dict (tested via CLI below)
    half = {k: v.astype(np.float16) for k, v in official_sd.items() if "pos_embed" not in k}
    half.update({k: official_sd[k] for k in ("encoder.pos_embed", "decoder_pos_embed")})
    hp, _, _ = convert_official({k: v.astype(np.float32) for k, v in half.items()})
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(hp), jax.tree.leaves(params)))
    assert 0 < err < 1e-2
    assert flax_key("encoder.blocks.11.attn.qkv.weight", np.zeros((576, 192)))[0] == "encoder/blocks_11/attn/qkv/kernel"


def test_convert_cli_and_load_model(tmp_path, official_sd):
    torch = pytest.importorskip("torch")
    from defusion_jax.api import load_model

    sd16 = {f"module.{k}": torch.from_numpy(v).half() for k, v in official_sd.items()}
    src = tmp_path / "dp_half.pth"
    torch.save({"state_dict": sd16, "epoch": 3}, src)
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, "-m", "defusion_jax.convert", "official", "--input", str(src),
                        "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "13,420,800 parameters" in r.stdout
    model = load_model(out)
    ref = {k: v.astype(np.float16).astype(np.float32) for k, v in official_sd.items()}
    params, _, _ = convert_official(ref)
    jax.tree.map(np.testing.assert_array_equal, model.params, params)
    # Bad input: one line, exit 2, no traceback.
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "defusion_jax.convert", "official", "--input", str(bad),
                        "--output", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # An --output that cannot be written (a file there): the same.
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([sys.executable, "-m", "defusion_jax.convert", "official", "--input", str(src),
                        "--output", str(tmp_path / "afile")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"error: cannot write {tmp_path / 'afile'}: "), r.stderr
