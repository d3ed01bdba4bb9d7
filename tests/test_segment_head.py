"""Segmentation head: torch references for pooling and resizing, pyramid strides at 480x640."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from defusion_jax.models import seg_head

torch = pytest.importorskip("torch")

TINY = dict(backbone=dict(vit=dict(width=64, depth=2, heads=2, mlp_dim=128, eps=1e-6), dim=64, heads=4),
            num_classes=9, pyramid_dim=32, head_channels=32, norm_groups=8)


@pytest.mark.parametrize("hw,out", [((15, 20), (6, 6)), ((2, 3), (6, 6)), ((7, 5), (3, 2)), ((4, 4), (1, 1))])
def test_adaptive_avg_pool_matches_torch(hw, out):
    x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
    want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out)
    got = seg_head.adaptive_avg_pool(jnp.asarray(x), out)
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize("hw,out", [((4, 5), (16, 20)), ((3, 3), (7, 11)), ((15, 20), (480, 640))])
def test_bilinear_upsampling_matches_torch_align_corners_false(hw, out):
    x = np.random.default_rng(1).normal(size=(1, *hw, 2)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out, mode="bilinear",
                                           align_corners=False)
    got = seg_head.resize_bilinear(jnp.asarray(x), out)
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_pyramid_strides_and_full_resolution_shapes():
    """480x640 (the MSRS size) gives a 30x40 token grid, pyramid levels at strides 4/8/16/32 and
    logits at full size; checked abstractly (no compute)."""
    model = seg_head.build_seg_model(TINY)
    x = jax.ShapeDtypeStruct((1, 480, 640, 3), jnp.float32)
    params = jax.eval_shape(lambda k: model.init({"params": k}, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3))),
                            jax.random.key(0))
    logits, state = jax.eval_shape(lambda p, a: model.apply(p, a, a, capture_intermediates=lambda mdl, name: name in ("__call__", "features")), params, x)
    inter = state["intermediates"]
    assert inter["backbone"]["features"][0].shape == (1, 1 + 30 * 40, 64)  # cls + 30x40 grid
    levels = inter["pyramid"]["__call__"][0]
    assert [lv.shape for lv in levels] == [(1, 120, 160, 32), (1, 60, 80, 32), (1, 30, 40, 32), (1, 15, 20, 32)]
    assert inter["decode_head"]["__call__"][0].shape == (1, 120, 160, 9)  # stride 4
    assert logits.shape == (1, 480, 640, 9)
    assert set(params["params"]) == {"backbone", "pyramid", "decode_head"}
    # only what `features` uses: no pixel heads, no MFM decoder
    assert not any(k.startswith(("mim_decoder", "decoder_common_blocks_1", "latent_predict"))
                   for k in params["params"]["backbone"])
