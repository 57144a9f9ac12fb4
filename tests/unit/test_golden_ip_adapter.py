"""IP-Adapter SDXL (base and Plus) files give what the official code gives (README, "Golden parity").

Projection: tencent-ailab/IP-Adapter's ``Resampler`` (Plus) and ``ImageProjModel`` (base), with the
unconditional image prompt (Plus: the encoded all-zero normalised image; base: zero embeds). Attention:
cubiq/ComfyUI_IPAdapter_plus's ``Attn2Replace`` with one masked ``ipadapter_attention`` per subject, on a
non-square token grid with three overlapping regions, batch rows in the order [uncond, cond], plain and with
``layer_weights``. Goldens: tests/goldens/ip_adapter_sdxl.safetensors (scripts/make_goldens.py).
"""
from __future__ import annotations

import pytest
import torch
from fixtures.goldens import assert_parity, golden, golden_meta
from fixtures.sdxl_adapters import ip_adapter_plus_state_dict, ip_adapter_sdxl_state_dict
from fixtures.tiny_models import ensure_comfy, tiny_sdxl

G = golden("ip_adapter_sdxl")
META = golden_meta("ip_adapter_sdxl")
LAYER = ("output", 2, 0)  # file index 13; ComfyUI transformer_index 7
FORMATS = {"plus": ("ip-adapter-plus-sdxl", ip_adapter_plus_state_dict, 1),
           "base": ("ip-adapter-sdxl", ip_adapter_sdxl_state_dict, 2)}


@pytest.fixture(scope="module")
def model():
    return tiny_sdxl()


def load(kind: str):
    from comfyui_troupe.models.sdxl.formats import load_sdxl

    fmt, make, seed = FORMATS[kind]
    sd = make(seed=seed)
    assert torch.equal(sd["ip_adapter.13.to_k_ip.weight"][:4], G[f"{kind}_to_k_ip_rows"]), \
        "the fixture changed: regenerate tests/goldens with scripts/make_goldens.py"
    return load_sdxl(sd, fmt)


def features(kind: str):
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures

    n = 3
    if kind == "plus":
        pen = G["plus_features"]
        return ClipFeatures(hidden=pen[:, None].expand(n, 3, -1, -1), layers=(1, 2, 3), encoder="tiny",
                            labels=("a", "b", "c"), depth=4, penultimate=pen,
                            uncond_penultimate=G["plus_uncond_features"], crop="centre crop")
    return ClipFeatures(hidden=torch.zeros(n, 3, 2, 64), layers=(1, 2, 3), encoder="tiny", labels=("a", "b", "c"),
                        depth=4, image_embeds=G["base_embeds"], uncond_image_embeds=torch.zeros(1, 48),
                        crop="centre crop")


@pytest.mark.parametrize("kind", ["plus", "base"])
def test_projection_and_unconditional_prompt_are_tencents(kind):
    adapter = load(kind).module
    x = G["plus_features"] if kind == "plus" else G["base_embeds"]
    ux = G["plus_uncond_features"] if kind == "plus" else torch.zeros(1, 48)
    with torch.no_grad():
        assert_parity(adapter.subject_tokens(x)[:, 0], G[f"{kind}_tokens"])
        assert_parity(adapter.subject_tokens(ux)[:, 0], G[f"{kind}_uncond_tokens"])


def patched_attn2(model, kind: str, layer_weights: str = ""):
    """The attn2 replace TroupeApplySDXL installs at LAYER, for three subjects in overlapping boxes."""
    ensure_comfy()
    from comfyui_troupe.models.layout.layout import Layout, Region
    from comfyui_troupe.models.sdxl.patch import RegionalParams
    from comfyui_troupe.nodes import sdxl

    layout = Layout(160, 96, tuple(Region(box=tuple(float(x) for x in b)) for b in G["boxes"]))
    params = RegionalParams(weight=float(META["weight"]), subject_weights=tuple(G["subject_weights"].tolist()),
                            blocks="all", layer_weights=layer_weights)
    m = sdxl.apply_sdxl(model, load(kind), features(kind), layout, params)
    return m.model_options["transformer_options"]["patches_replace"]["attn2"][LAYER]


def extra_options() -> dict:
    return {"n_heads": 2, "sigmas": torch.tensor([5.0, 5.0]), "cond_or_uncond": [1, 0], "block": LAYER[:2],
            "block_index": LAYER[2], "transformer_index": 7, "original_shape": [2, 4, 12, 20]}


@pytest.mark.parametrize("kind", ["plus", "base"])
@pytest.mark.parametrize("layer_weights, expected", [
    ("", "out"), (META["layer_weights"], "out_layer_weights"), ("0:1", "out_layer_absent"),
])
def test_masked_attention_is_ipadapter_plus(model, kind, layer_weights, expected):
    attn2 = patched_attn2(model, kind, layer_weights)
    with torch.no_grad():
        out = attn2(G["q"].clone(), G["k"], G["v"], extra_options())
    assert_parity(out, G[f"{kind}_{expected}"])
