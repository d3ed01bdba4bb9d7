"""CLIP-IQA (Wang et al., AAAI'23) as pyiqa computes it; runs only with user-supplied OpenAI CLIP RN50 weights.

The weights are not shipped and cannot be fetched at run time. Scoring needs the `open_clip_torch`
package (its tokenizer ships the BPE vocabulary) and torch.
"""
from __future__ import annotations

import numpy as np

# pyiqa's prompt pairs (positive first); CLIP normalisation constants.
PROMPTS = (("Good photo.", "Bad photo."), ("High quality.", "Low quality."), ("Sharp photo.", "Blurry photo."))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ABSENT = ("CLIPIQA needs OpenAI CLIP RN50 weights (not shipped, not downloadable here): "
          "pass --clip-weights PATH to an RN50 .pt file")


def clipiqa_from_logits(logits: np.ndarray) -> float:
    """CLIPIQA: mean over antonym prompt pairs of softmax(logits)[positive]; logits shaped (pairs, 2)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return float(p[:, 0].mean())


class ClipIQA:
    """Callable scorer: HxWx3 float image in [0,1] -> CLIP-IQA score (no resize, no positional embedding, as pyiqa)."""

    def __init__(self, weights: str):
        try:
            import open_clip
            import torch
        except ImportError as exc:
            raise RuntimeError(f"CLIPIQA needs torch and open_clip_torch installed ({exc})") from exc
        self.torch = torch
        model = open_clip.load_openai_model(str(weights), device="cpu", jit=False)
        model.eval()
        tok = open_clip.get_tokenizer("RN50")
        texts = [t for pair in PROMPTS for t in pair]
        with torch.no_grad():
            tf = model.encode_text(tok(texts)).float()
        self.text = tf / tf.norm(dim=-1, keepdim=True)
        self.model = model
        self.scale = float(model.logit_scale.exp())

    def _image_features(self, x):
        visual = self.model.visual
        pool = visual.attnpool
        torch = self.torch
        # pyiqa (pos_embedding=False): the attention pool is used without its positional embedding so
        # images of any size can be scored without resizing.
        h = visual.stem(x) if hasattr(visual, "stem") else None
        if h is None:
            h = x
            for conv, bn in ((visual.conv1, visual.bn1), (visual.conv2, visual.bn2), (visual.conv3, visual.bn3)):
                h = visual.act1(bn(conv(h))) if hasattr(visual, "act1") else torch.relu(bn(conv(h)))
            h = visual.avgpool(h)
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            h = layer(h)
        t = h.flatten(2).permute(2, 0, 1)
        t = torch.cat([t.mean(dim=0, keepdim=True), t], dim=0)
        out, _ = torch.nn.functional.multi_head_attention_forward(
            query=t[:1], key=t, value=t, embed_dim_to_check=t.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        return out[0]

    def __call__(self, img: np.ndarray) -> float:
        torch = self.torch
        x = (np.asarray(img, np.float32) - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        with torch.no_grad():
            f = self._image_features(x).float()
        f = f / f.norm(dim=-1, keepdim=True)
        logits = (self.scale * f @ self.text.T).reshape(len(PROMPTS), 2).numpy()
        return clipiqa_from_logits(logits)
