"""MS-Diffusion files give what MS-Diffusion's own code gives (README, "Golden parity").

Grounding resampler (``msdiffusion/models/projection.py``) on three subjects with phrase and box embeddings,
and ``MaskedIPAttnProcessor2_0`` with its dummy tokens on three overlapping boxes (MS-Diffusion's processor
takes square grids only: 8 x 8), batch [uncond with zero boxes and a zero image prompt, cond], global scale
0.6, and per-subject scales (the processor then drops the global scale). Goldens:
tests/goldens/ms_diffusion.safetensors (scripts/make_goldens.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures.goldens import assert_parity, golden
from fixtures.sdxl_adapters import ms_diffusion_state_dict
from fixtures.tiny_models import ensure_comfy, tiny_sdxl

G = golden("ms_diffusion")
LAYER = ("output", 2, 0)  # file index 13


@pytest.fixture(scope="module")
def model():
    return tiny_sdxl()


def load():
    from comfyui_troupe.models.sdxl.formats import load_sdxl

    sd = ms_diffusion_state_dict(seed=3)
    assert torch.equal(sd["ms_adapter.13.to_k_ip.weight"][:4], G["to_k_ip_rows"]), \
        "the fixture changed: regenerate tests/goldens with scripts/make_goldens.py"
    return load_sdxl(sd, "ms-diffusion")


def test_grounding_resampler_is_ms_diffusions():
    with torch.no_grad():
        tokens = load().module.subject_tokens(G["features"], G["boxes"], G["phrases"])
    assert_parity(tokens[:, 0], G["tokens"])


def layout():
    from comfyui_troupe.models.layout.layout import Layout, Region

    return Layout(128, 128, tuple(Region(box=tuple(float(x) for x in b)) for b in G["boxes"]))


def attn2(model, monkeypatch, subject_weights=(), **params):
    """TroupeApplySDXL's attn2 replace at LAYER; the labels' CLIP-L embeddings are the golden's phrases."""
    ensure_comfy()
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures
    from comfyui_troupe.models.sdxl.patch import RegionalParams
    from comfyui_troupe.nodes import sdxl

    monkeypatch.setattr(sdxl, "phrase_embeddings", lambda clip, labels: G["phrases"])
    feats = ClipFeatures(hidden=G["features"][:, None].expand(3, 3, -1, -1), layers=(1, 2, 3), encoder="tiny",
                         labels=("a", "b", "c"), depth=4, penultimate=G["features"], crop="stretch")
    p = RegionalParams(weight=0.6, subject_weights=tuple(subject_weights), blocks="all", **params)
    m = sdxl.apply_sdxl(model, load(), feats, layout(), p, clip=object())
    return m.model_options["transformer_options"]["patches_replace"]["attn2"][LAYER]


def run(patch) -> torch.Tensor:
    """The processor's output: the attn2 result through the layer's output projection."""
    q = F.linear(G["hidden"], G["to_q"])
    extra = {"n_heads": 2, "sigmas": torch.tensor([5.0, 5.0]), "cond_or_uncond": [1, 0], "block": LAYER[:2],
             "block_index": LAYER[2], "transformer_index": 7, "original_shape": [2, 4, 16, 16]}
    with torch.no_grad():
        out = patch(q, G["k_text"], G["v_text"], extra)
    return F.linear(out, G["to_out_weight"], G["to_out_bias"])


def test_masked_attention_with_dummy_tokens_is_ms_diffusions(model, monkeypatch):
    assert_parity(run(attn2(model, monkeypatch)), G["out"])


def test_subject_scales_replace_the_global_scale_as_ms_diffusion_does(model, monkeypatch):
    assert_parity(run(attn2(model, monkeypatch, G["subject_weights"].tolist())), G["out_subject_scales"])
