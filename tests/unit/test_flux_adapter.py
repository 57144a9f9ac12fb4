"""models/flux_adapter.py: the FLUX adapter formats (troupe-flux, InstantX FLUX.1-dev IP-Adapter), Eq. 2 of 004's
K/V projections, the token-grid masks of Eq. 9 and what TroupeApplyFLUX feeds each format."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fixtures.flux_adapters import flat, instantx_state_dict, troupe_flux_state_dict
from fixtures.tiny_models import ensure_comfy, flux_conditioning, sample, tiny_flux


@pytest.fixture(scope="module")
def fa():
    from comfyui_troupe.models.flux import adapter as flux_adapter

    return flux_adapter


@pytest.fixture(scope="module")
def errors():
    from comfyui_troupe.models.adapter_file import AdapterFormatError, detect_and_load, read_state_dict

    return AdapterFormatError, detect_and_load, read_state_dict


def rms(x, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_troupe_layout_loads_and_maps_every_block(fa):
    sd = troupe_flux_state_dict()
    adapter = fa.load(sd, fa.detect(sd))
    c = adapter.module.config
    assert (adapter.family, adapter.format) == ("flux", "troupe-flux")
    assert (c.encoder_dim, c.hidden_size, c.double_blocks, c.single_blocks, c.head_dim) == (64, 64, 2, 2, 32)
    m = adapter.module
    for kind, count, nd in (("double", 2, 2), ("single", 2, 2)):
        for i in range(count):
            layer = m.layer(kind, i, nd)
            assert torch.equal(layer.to_k_ip.weight, sd[f"{kind}_blocks.{i}.to_k_ip.weight"])
            assert torch.equal(layer.norm_k.scale, sd[f"{kind}_blocks.{i}.norm_k.scale"])
    assert "2 double + 2 single" in adapter.summary()


def test_troupe_projection_and_kv_eq2(fa):
    """Reference tokens: LayerNorm(Linear(tokens)); K = RMSNorm(C W_k^T) * scale per head, V = C W_v^T (Eq. 2)."""
    sd = troupe_flux_state_dict()
    m = fa.build(sd, "troupe-flux")
    enc = torch.randn(2, 5, 64)
    c = m.reference_tokens(enc)
    y = enc @ sd["image_proj.proj.weight"].T + sd["image_proj.proj.bias"]
    ref = F.layer_norm(y, (64,), sd["image_proj.norm.weight"], sd["image_proj.norm.bias"])
    torch.testing.assert_close(c, ref)
    k, v = m.layer("single", 1, 2).kv(c, 32, norm_v=False, eps=1e-6)
    kr = (c @ sd["single_blocks.1.to_k_ip.weight"].T).view(2, 5, 2, 32).transpose(1, 2)
    vr = (c @ sd["single_blocks.1.to_v_ip.weight"].T).view(2, 5, 2, 32).transpose(1, 2)
    torch.testing.assert_close(k, rms(kr, 1e-6) * sd["single_blocks.1.norm_k.scale"])
    torch.testing.assert_close(v, vr)


def test_instantx_layout_bin_loads_and_runs(fa, errors, tmp_path):
    """A scaled-down InstantX file (nested bf16 pickle, published key names) loads through read_state_dict, its
    projection is MLP -> T tokens -> LayerNorm, K and V get a per-head RMSNorm (eps 1e-5, no affine), and it runs."""
    _, detect_and_load, read_state_dict = errors
    nested = instantx_state_dict()
    torch.save(nested, tmp_path / "ip-adapter.bin")
    sd = read_state_dict(str(tmp_path / "ip-adapter.bin"))
    assert sorted(sd) == sorted(flat(nested))
    adapter = detect_and_load(sd, [fa.FAMILY], filename="ip-adapter.bin")
    assert adapter.format == "instantx-flux"
    c = adapter.module.config
    assert (c.encoder_dim, c.context_dim, c.num_tokens, c.hidden_size, c.single_blocks) == (48, 4096, 4, 64, 4)
    pooled = torch.randn(3, 48)
    tokens = adapter.module.reference_tokens(pooled)
    p = {k: v.float() for k, v in nested["image_proj"].items()}
    h = F.gelu(pooled.bfloat16().float() @ p["proj.0.weight"].T + p["proj.0.bias"])
    ref = F.layer_norm((h @ p["proj.2.weight"].T + p["proj.2.bias"]).view(3, 4, 4096), (4096,), p["norm.weight"],
                       p["norm.bias"])
    torch.testing.assert_close(tokens, ref, atol=0.05, rtol=0.05)  # the module runs in the file's bf16
    # ip_adapter.{n}: double blocks first, then single blocks (model with 2 double blocks)
    layer = adapter.module.layer("single", 0, 2)
    assert torch.equal(layer.to_k_ip.weight, nested["ip_adapter"]["2.to_k_ip.weight"])
    k, v = layer.kv(tokens, 32, norm_v=True, eps=1e-5, dtype=torch.float32)
    wk = nested["ip_adapter"]["2.to_k_ip.weight"].float()
    wv = nested["ip_adapter"]["2.to_v_ip.weight"].float()
    torch.testing.assert_close(k, rms((tokens @ wk.T).view(3, 4, 2, 32).transpose(1, 2), 1e-5), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v, rms((tokens @ wv.T).view(3, 4, 2, 32).transpose(1, 2), 1e-5), atol=1e-4, rtol=1e-4)

    ensure_comfy()
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures
    from comfyui_troupe.nodes.flux import ApplySettings, apply_flux

    base = tiny_flux()
    feats = ClipFeatures(hidden=torch.randn(2, 3, 5, 64), layers=(10, 17, 24), encoder="tiny", labels=("a", "b"),
                         depth=24, image_embeds=torch.randn(2, 48))
    patched = apply_flux(base, adapter, feats, ApplySettings())
    pos, neg = flux_conditioning(0), flux_conditioning(1)
    latent = torch.zeros(1, 16, 8, 8)
    out = sample(patched, pos, neg, latent, steps=2)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(base, pos, neg, latent, steps=2))


def test_wrong_files_name_the_keys(fa, errors):
    AdapterFormatError, detect_and_load, _ = errors
    sd = troupe_flux_state_dict()
    del sd["single_blocks.1.to_v_ip.weight"]
    sd["single_blocks.0.extra.weight"] = torch.zeros(1)
    sd["double_blocks.1.to_k_ip.weight"] = torch.zeros(64, 32)
    with pytest.raises(AdapterFormatError) as e:
        detect_and_load(sd, [fa.FAMILY])
    msg = str(e.value)
    assert "troupe-flux adapter file does not fit its layout" in msg
    assert "missing keys: single_blocks.1.to_v_ip.weight" in msg
    assert "unexpected keys: single_blocks.0.extra.weight" in msg
    assert "double_blocks.1.to_k_ip.weight (64, 32) (expected (64, 64))" in msg

    ix = flat(instantx_state_dict())
    del ix["ip_adapter.1.to_v_ip.weight"]
    del ix["image_proj.norm.bias"]
    with pytest.raises(AdapterFormatError, match=r"instantx-flux adapter file does not fit its layout: missing keys: "
                                                 r"image_proj.norm.bias, ip_adapter.1.to_v_ip.weight"):
        detect_and_load(ix, [fa.FAMILY])
    from fixtures.flux_adapters import xlabs_state_dict

    xl = xlabs_state_dict()
    del xl["double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"]
    with pytest.raises(AdapterFormatError, match=r"xlabs-flux adapter file does not fit its layout: missing keys: "
                                                 r"double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"):
        detect_and_load(xl, [fa.FAMILY])
    # an SD/SDXL IP-Adapter (odd layer numbers, 2048-wide keys) is not taken for a FLUX one
    sdxl = {"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(640, 2048)}
    assert fa.detect(sdxl) is None
    with pytest.raises(AdapterFormatError, match=r"not a known adapter format: found .*troupe-flux"):
        detect_and_load({"unet.x": torch.zeros(1)}, [fa.FAMILY])


def test_loader_node_knows_the_flux_family(fa):
    ensure_comfy()
    from comfyui_troupe.nodes.adapter import families

    assert any(f.name == "flux" for f in families())


def test_token_masks_follow_comfyui_padding():
    """M_i at the token grid: ComfyUI pads odd latents to 2x2 patches, so the grid is ceil(size / 2) and the
    padded pixels do not count in a token's average."""
    from comfyui_troupe.models.flux.injection import token_masks
    from comfyui_troupe.models.layout.grid import token_grid
    from comfyui_troupe.models.layout.layout import Layout, Region

    assert token_grid(9, 7) == (5, 4) and token_grid(128, 128) == (64, 64) and token_grid(1, 1) == (1, 1)
    ensure_comfy()
    import comfy.ldm.common_dit

    x = torch.zeros(1, 1, 9, 7)
    assert comfy.ldm.common_dit.pad_to_patch_size(x, (2, 2)).shape[-2:] == (10, 8)  # what token_grid mirrors
    lay = Layout(70, 90, (Region(box=(0.0, 0.0, 1.0, 1.0)), Region(box=(0.0, 8 / 9, 1.0, 1.0))))
    m = token_masks(lay, 9, 7).view(2, 5, 4)
    assert torch.equal(m[0], torch.ones(5, 4))  # full canvas: 1 everywhere, padding does not dilute it
    expect = torch.zeros(5, 4)
    expect[4] = 1.0  # the bottom latent row is token row 4 (whose second row is padding)
    torch.testing.assert_close(m[1], expect)


def test_feature_widths_are_checked_against_the_adapter(fa):
    ensure_comfy()
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures
    from comfyui_troupe.nodes.flux import adapter_inputs

    troupe = fa.load(troupe_flux_state_dict(encoder_dim=32), "troupe-flux")
    feats = ClipFeatures(hidden=torch.randn(2, 3, 5, 64), layers=(10, 17, 24), encoder="24 layers, width 64",
                         labels=("a", "b"), depth=24)
    with pytest.raises(ValueError, match=r"TroupeApplyFLUX: input 'features': the adapter reads tokens of width 32 "
                                         r"but these layer 24 tokens have width 64"):
        adapter_inputs(troupe, feats)
    ix = fa.load(flat(instantx_state_dict()), "instantx-flux")
    with pytest.raises(ValueError, match=r"needs the encoder's pooled output \(width 48"):
        adapter_inputs(ix, feats)
    # ComfyUI's SigLIP gives all post-layernorm tokens as image_embeds: their mean stands in for the pooled output
    siglip_like = ClipFeatures(hidden=torch.randn(2, 3, 5, 64), layers=(10, 17, 24), encoder="siglip",
                               labels=("a", "b"), depth=24, image_embeds=torch.randn(2, 7, 48))
    torch.testing.assert_close(adapter_inputs(ix, siglip_like), siglip_like.image_embeds.mean(1))
    wrong = ClipFeatures(hidden=torch.randn(2, 3, 5, 64), layers=(10, 17, 24), encoder="vit", labels=("a", "b"),
                         depth=24, image_embeds=torch.randn(2, 768))
    with pytest.raises(ValueError, match=r"reads pooled embeddings of width 48 \(SigLIP so400m 384\), these have "
                                         r"width 768"):
        adapter_inputs(ix, wrong)


def test_apply_refuses_models_and_inputs_that_do_not_fit(fa):
    ensure_comfy()
    from fixtures.tiny_models import tiny_sdxl

    from comfyui_troupe.models.encoding.reference_features import ClipFeatures
    from comfyui_troupe.models.layout.layout import Layout, Region
    from comfyui_troupe.nodes.flux import ApplySettings, apply_flux

    feats = ClipFeatures(hidden=torch.randn(2, 3, 5, 64), layers=(10, 17, 24), encoder="tiny", labels=("a", "b"),
                         depth=24)
    big = fa.load(troupe_flux_state_dict(double=3), "troupe-flux")
    with pytest.raises(ValueError, match=r"input 'model': the adapter has 3 double \+ 2 single block layers but "
                                         r"the model has 2 \+ 2"):
        apply_flux(tiny_flux(), big, feats, ApplySettings())
    ok = fa.load(troupe_flux_state_dict(), "troupe-flux")
    with pytest.raises(ValueError, match=r"input 'model': not a FLUX-shaped model"):
        apply_flux(tiny_sdxl(), ok, feats, ApplySettings())
    with pytest.raises(ValueError, match=r"input 'layout': the layout has 1 regions but there are 2 subjects"):
        apply_flux(tiny_flux(), ok, feats, ApplySettings(), layout=Layout(64, 64, (Region(box=(0, 0, 1, 1)),)))
    with pytest.raises(ValueError, match=r"input 'branches'"):
        apply_flux(tiny_flux(), ok, feats, ApplySettings(branches="text only"))
    assert math.isfinite(ok.module.config.norm_eps)
