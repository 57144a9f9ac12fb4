"""InstantX and XLabs FLUX IP-Adapter files give what their official code gives (README, "Golden parity").

One forward of the tiny FLUX DiT (ComfyUI's own Flux class) with the adapter applied by ``TroupeApplyFLUX``'s
work function, against: InstantX's ComfyUI port (``IPAFluxAttnProcessor2_0`` in every double and single block
through its ``FluxUpdateModules``; K and V RMS-normalised; in single blocks the term is added to the whole
stream, text tokens included; two subjects chained as two apply nodes), and XLabs' x-flux (its own ``Flux``
with ``IPDoubleStreamBlockProcessor`` on the double blocks; the term added to the image stream after the MLP).
Goldens: tests/goldens/{instantx,xlabs}_flux.safetensors (scripts/make_goldens.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from fixtures.goldens import assert_parity, golden, golden_flux, golden_meta
from fixtures.tiny_models import ensure_comfy


@pytest.fixture(scope="module")
def model():
    m = golden_flux()
    sd = m.model.diffusion_model.state_dict()
    g = golden("instantx_flux")
    assert torch.equal(sd["img_in.weight"], g["dit_img_in"]) and torch.equal(
        sd["single_blocks.1.linear2.weight"], g["dit_single_linear2"]), \
        "the tiny FLUX fixture changed: regenerate tests/goldens with scripts/make_goldens.py"
    return m


def adapter(name: str, fmt: str):
    from comfyui_troupe.models.flux import adapter as flux_adapter

    g = golden(name)
    sd = {k[len("adapter."):]: v for k, v in g.items() if k.startswith("adapter.")}
    return flux_adapter.load(sd, fmt)


def features(pooled: torch.Tensor, crop: str):
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures

    n = pooled.shape[0]
    return ClipFeatures(hidden=torch.zeros(n, 3, 2, 8), layers=(1, 2, 3), encoder="tiny",
                        labels=tuple("ab"[:n]), depth=3, image_embeds=pooled, pooled=pooled, crop=crop)


def model_output(model, g: dict) -> torch.Tensor:
    """The DiT's output for the golden inputs, called as the sampler calls it (apply_model, flow: x - sigma * v)."""
    x, sigma = g["x"], g["timestep"]
    to = copy.copy(model.model_options.get("transformer_options", {}))
    to["sigmas"], to["cond_or_uncond"] = sigma, [0]
    with torch.inference_mode():
        denoised = model.model.apply_model(x, sigma, c_crossattn=g["context"], y=g["y"], guidance=g["guidance"],
                                           transformer_options=to)
    return (x - denoised) / sigma


def apply(model, name: str, fmt: str, pooled: torch.Tensor, crop: str, **settings):
    ensure_comfy()
    from comfyui_troupe.nodes import flux

    s = flux.ApplySettings(weight=float(golden_meta(name)["weight"]), **settings)
    return flux.apply_flux(model, adapter(name, fmt), features(pooled, crop), s)


def test_instantx_default_is_instantx_injection(model):
    g = golden("instantx_flux")
    patched = apply(model, "instantx_flux", "instantx-flux", g["pooled"], "stretch")
    assert_parity(model_output(patched, g), g["out"])


def test_xlabs_default_is_x_flux(model):
    g = golden("xlabs_flux")
    patched = apply(model, "xlabs_flux", "xlabs-flux", g["embeds"], "centre crop")
    assert_parity(model_output(patched, g), g["out"])


def test_instantx_adds_to_text_tokens_in_single_blocks(model):
    """DynaIP's image-only rule is not how InstantX files were trained: it misses the official output."""
    g = golden("instantx_flux")
    patched = apply(model, "instantx_flux", "instantx-flux", g["pooled"], "stretch", branches="image branch only")
    with pytest.raises(AssertionError):
        assert_parity(model_output(patched, g), g["out"])


@pytest.mark.parametrize("name, fmt, field, value", [
    ("instantx_flux", "instantx-flux", "norm_v", False),  # some derivatives skip V's RMSNorm: the file does not
    ("xlabs_flux", "xlabs-flux", "inject", "attention"),  # XLabs adds after the MLP, not to the attention output
])
def test_public_variants_miss_the_official_output(model, monkeypatch, name, fmt, field, value):
    import dataclasses

    from comfyui_troupe.models.flux import adapter as flux_adapter

    load = flux_adapter.load

    def variant(sd, f):
        a = load(sd, f)
        a.module.config = dataclasses.replace(a.module.config, **{field: value})
        return a

    monkeypatch.setattr(flux_adapter, "load", variant)
    g = golden(name)
    pooled = g["pooled"] if name == "instantx_flux" else g["embeds"]
    patched = apply(model, name, fmt, pooled, "stretch")
    with pytest.raises(AssertionError):
        assert_parity(model_output(patched, g), g["out"])


def test_the_goldens_are_not_the_base_model(model):
    """Negative control: the official adapters change the output well beyond the tolerance."""
    for name in ("instantx_flux", "xlabs_flux"):
        g = golden(name)
        base = model_output(model, g)
        assert float((base - g["out"]).abs().max()) > 100 * 1e-4 * float(g["out"].abs().max())
