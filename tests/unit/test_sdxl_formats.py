"""SDXL adapter files: the four formats found, loaded and checked key by key; the published layouts (MS-Diffusion's
ms_adapter.bin, IP-Adapter SDXL / Plus) written out independently here, at full size on the meta device."""
from __future__ import annotations

import pytest
import torch
from fixtures.sdxl_adapters import (
    TINY_WIDTHS,
    full_sdxl_widths,
    ip_adapter_plus_state_dict,
    ip_adapter_sdxl_state_dict,
    ms_diffusion_state_dict,
    r3_adapter,
    r3_state_dict,
    write_adapter,
)
from safetensors import safe_open

from comfyui_troupe.models.adapter_file import AdapterFormatError, detect_and_load, read_state_dict
from comfyui_troupe.models.encoding.reference_features import ClipFeatures
from comfyui_troupe.models.sdxl.adapter import SdxlAdapter
from comfyui_troupe.models.sdxl.formats import FAMILY, detect, file_state_dict, save_sdxl_adapter

# --------------------------------------------------------------------------- the published layouts, by hand


def perceiver_shapes(dim: int, depth: int, embedding_dim: int, out: int = 2048) -> dict[str, tuple[int, ...]]:
    """IP-Adapter's / MS-Diffusion's resampler keys (image_proj.*): 64-wide heads, FF x4."""
    s = {"proj_in.weight": (dim, embedding_dim), "proj_in.bias": (dim,), "proj_out.weight": (out, dim),
         "proj_out.bias": (out,), "norm_out.weight": (out,), "norm_out.bias": (out,)}
    for i in range(depth):
        p = f"layers.{i}."
        s |= {p + "0.norm1.weight": (dim,), p + "0.norm1.bias": (dim,), p + "0.norm2.weight": (dim,),
              p + "0.norm2.bias": (dim,), p + "0.to_q.weight": (dim, dim), p + "0.to_kv.weight": (2 * dim, dim),
              p + "0.to_out.weight": (dim, dim), p + "1.0.weight": (dim,), p + "1.0.bias": (dim,),
              p + "1.1.weight": (4 * dim, dim), p + "1.3.weight": (dim, 4 * dim)}
    return {"image_proj." + k: v for k, v in s.items()}


def layer_shapes(prefix: str, widths) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{2 * i + 1}.to_{kv}_ip.weight": (w, 2048) for i, w in enumerate(widths) for kv in "kv"}


def ms_diffusion_shapes(widths, dim=1280, depth=4, embedding_dim=1664, queries=16, phrase=768):
    """ms_adapter.bin: image_proj (grounding resampler), ms_adapter (odd attn2 indices), dummy_image_tokens."""
    g = phrase + 64
    s = perceiver_shapes(dim, depth, embedding_dim)
    s |= {"image_proj.grounding_latents": (1, queries, dim), "image_proj.latent_proj.0.weight": (2 * g, g),
          "image_proj.latent_proj.0.bias": (2 * g,), "image_proj.latent_proj.2.weight": (dim * queries, 2 * g),
          "image_proj.latent_proj.2.bias": (dim * queries,), "image_proj.latent_norm.weight": (dim,),
          "image_proj.latent_norm.bias": (dim,), "image_proj.attention_norm.weight": (dim,),
          "image_proj.attention_norm.bias": (dim,), "dummy_image_tokens": (1, 4, 2048)}
    return s | layer_shapes("ms_adapter", widths)


def ip_plus_shapes(widths, dim=1280, depth=4, embedding_dim=1280, queries=16):
    """ip-adapter-plus_sdxl_vit-h: image_proj (resampler with learned latents), ip_adapter."""
    return perceiver_shapes(dim, depth, embedding_dim) | {"image_proj.latents": (1, queries, dim)} \
        | layer_shapes("ip_adapter", widths)


def ip_base_shapes(widths, embeds=1280, tokens=4):
    """ip-adapter_sdxl: image_proj.proj / norm (4 tokens), ip_adapter."""
    return {"image_proj.proj.weight": (tokens * 2048, embeds), "image_proj.proj.bias": (tokens * 2048,),
            "image_proj.norm.weight": (2048,), "image_proj.norm.bias": (2048,)} | layer_shapes("ip_adapter", widths)


def meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def shapes_of(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# --------------------------------------------------------------------------- tests


def test_fixtures_are_the_published_layouts_scaled_down():
    assert shapes_of(ms_diffusion_state_dict(0)) == ms_diffusion_shapes(TINY_WIDTHS, dim=64, depth=2,
                                                                        embedding_dim=64, queries=4)
    assert shapes_of(ip_adapter_plus_state_dict(0)) == ip_plus_shapes(TINY_WIDTHS, dim=64, depth=2,
                                                                      embedding_dim=64, queries=4)
    assert shapes_of(ip_adapter_sdxl_state_dict(0)) == ip_base_shapes(TINY_WIDTHS, embeds=48)


@pytest.mark.parametrize("shapes, fmt, image_input, tokens", [
    (ms_diffusion_shapes(full_sdxl_widths()), "ms-diffusion", "CLIP ViT-bigG/14 penultimate hidden states (width 1664)",
     "16"),
    (ip_plus_shapes(full_sdxl_widths()), "ip-adapter-plus-sdxl", "CLIP ViT-H/14 penultimate hidden states (width 1280)",
     "16"),
    (ip_base_shapes(full_sdxl_widths()), "ip-adapter-sdxl", "CLIP ViT-bigG/14 projected image embeds (width 1280)",
     "4"),
    (ip_base_shapes(full_sdxl_widths(), embeds=1024), "ip-adapter-sdxl",
     "CLIP ViT-H/14 projected image embeds (width 1024)", "4"),
])
def test_full_size_published_files_load(shapes, fmt, image_input, tokens):
    """The real files' shapes (meta tensors: nothing allocated) are recognised, sized and reported."""
    adapter = detect_and_load(meta(shapes), [FAMILY], filename="x.bin")
    m = adapter.module
    assert adapter.format == fmt and adapter.family == "sdxl"
    assert adapter.info["image input"] == image_input and adapter.info["tokens per subject"] == tokens
    assert adapter.info["cross-attention layers"] == "70 (widths 640, 1280; context 2048)"
    assert m.num_levels == 1 and m.semantics == ("joint" if fmt == "ms-diffusion" else "separate")
    if fmt == "ms-diffusion":
        c = m.image_proj.config
        assert (c.dim, c.depth, c.heads, c.dim_head, c.num_queries, c.phrase_dim) == (1280, 4, 20, 64, 16, 768)
        assert m.needs_phrases and tuple(m.dummy_tokens.shape) == (1, 4, 2048)
        assert "exactly MS-Diffusion" in adapter.info["levels"]


def diffusers_attn2_names() -> list[str]:
    """SDXL's attention processors as diffusers lists them (down, up, then mid block), keeping the attn2 ones."""
    names = []
    for blk, attns, depth in (("down_blocks.1", 2, 2), ("down_blocks.2", 2, 10), ("up_blocks.0", 3, 10),
                              ("up_blocks.1", 3, 2), ("mid_block", 1, 10)):
        for a in range(attns):
            for t in range(depth):
                names += [f"{blk}.attentions.{a}.transformer_blocks.{t}.attn1",
                          f"{blk}.attentions.{a}.transformer_blocks.{t}.attn2"]
    return names


def test_layer_keys_map_diffusers_order_to_comfyui_blocks():
    """File index idx (odd) = position in diffusers' processor list; ComfyUI: down_blocks.1 = input 4/5, .2 = input
    7/8, up_blocks.0 = output 0-2, up_blocks.1 = output 3-5, mid_block = ("middle", 0)."""
    to_comfy = {"down_blocks.1": ("input", (4, 5)), "down_blocks.2": ("input", (7, 8)),
                "up_blocks.0": ("output", (0, 1, 2)), "up_blocks.1": ("output", (3, 4, 5)),
                "mid_block": ("middle", (0,))}
    m = detect_and_load(meta(ms_diffusion_shapes(full_sdxl_widths())), [FAMILY]).module
    keys = m.layer_keys()
    names = diffusers_attn2_names()
    assert len(names) == 140
    for idx, name in enumerate(names):
        if not name.endswith("attn2"):
            continue
        blk = name.split(".attentions")[0]
        a, t = int(name.split(".")[-4]), int(name.split(".")[-2])  # attentions.{a}.transformer_blocks.{t}
        block, ids = to_comfy[blk]
        want = (block, ids[a], t)
        assert keys[idx // 2] == want, name
        k, v = m.kv(want)
        assert k is m.layers[str(idx)].to_k_ip and v is m.layers[str(idx)].to_v_ip
    assert keys[-1] == ("middle", 0, 9) and m.kv(("middle", 0, 0))[0].weight.shape == (1280, 2048)
    assert m.kv(("input", 4, 1))[0].weight.shape == (640, 2048)
    with pytest.raises(KeyError, match=r"no adapter layer at \('middle', 1, 0\)"):
        m.kv(("middle", 1, 0))
    tiny = detect_and_load(ms_diffusion_state_dict(0), [FAMILY]).module
    assert tiny.layer_keys() == [("input", 4, 0), ("input", 5, 0), ("input", 7, 0), ("input", 8, 0),
                                 ("output", 0, 0), ("output", 1, 0), ("output", 2, 0), ("output", 3, 0),
                                 ("output", 4, 0), ("output", 5, 0), ("middle", 0, 0)]


@pytest.mark.parametrize("maker, fmt", [(ms_diffusion_state_dict, "ms-diffusion"), (r3_state_dict, "troupe-r3"),
                                        (ip_adapter_plus_state_dict, "ip-adapter-plus-sdxl"),
                                        (ip_adapter_sdxl_state_dict, "ip-adapter-sdxl")])
@pytest.mark.parametrize("nested_bin", [False, True])
def test_every_format_loads_from_safetensors_and_nested_bin(tmp_path, maker, fmt, nested_bin):
    sd = maker(3)
    path = write_adapter(tmp_path / ("a.bin" if nested_bin else "a.safetensors"), sd, nested_bin=nested_bin)
    adapter = detect_and_load(read_state_dict(str(path)), [FAMILY], filename=path.name)
    assert adapter.format == fmt and detect(sd) == fmt
    got = file_state_dict(adapter.module)
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert adapter.summary().startswith(f"{path.name}: {fmt} (SDXL)")


def test_r3_file_reports_its_levels_and_refines():
    sd = r3_state_dict(1, tokens=8)
    adapter = detect_and_load(sd, [FAMILY])
    m = adapter.module
    assert m.num_levels == 4 and m.refiner.config.topk == (8, 4) and m.refiner.config.heads == 16
    assert adapter.info["tokens per subject"] == "8 x 4 levels = 32"
    assert adapter.info["levels"].startswith("4 (T_base, T1, T2, T3; refiner alpha 1")
    gen = torch.Generator().manual_seed(0)
    x, boxes, phrases = torch.randn(2, 257, 64, generator=gen), torch.rand(2, 4, generator=gen), \
        torch.randn(2, 768, generator=gen)
    with torch.no_grad():
        levels = m.subject_tokens(x, boxes, phrases)
        base = m.image_proj(x, boxes, phrases)
        off = m.subject_tokens(x, boxes, phrases, refine=False)
        zero = m.subject_tokens(x, boxes, phrases, alpha=0.0)
    assert levels.shape == (2, 4, 8, 2048) and torch.equal(levels[:, 0], base)
    assert not torch.allclose(levels[:, 3], base)
    assert off.shape == (2, 1, 8, 2048) and torch.equal(off[:, 0], base)
    assert all(torch.equal(zero[:, i], base) for i in range(4))
    assert m.route(0.999).argmax() == 0 and m.route(0.0).argmax() == 3
    assert m.route(0.5, "static").tolist() == [0.25] * 4 and m.route(0.5, refine=False).tolist() == [1.0]


def test_ms_diffusion_and_ip_adapter_tokens():
    ms = detect_and_load(ms_diffusion_state_dict(2), [FAMILY]).module
    x, boxes, phrases = torch.randn(3, 257, 64), torch.rand(3, 4), torch.randn(3, 768)
    with torch.no_grad():
        t = ms.subject_tokens(x, boxes, phrases)
        assert t.shape == (3, 1, 4, 2048) and torch.equal(t[:, 0], ms.image_proj(x, boxes, phrases))
    assert ms.route(0.3).tolist() == [1.0] and ms.route(0.3, "static").tolist() == [1.0]
    with pytest.raises(ValueError, match="needs each subject's box and label embedding"):
        ms.subject_tokens(x, boxes)
    plus = detect_and_load(ip_adapter_plus_state_dict(2), [FAMILY]).module
    base = detect_and_load(ip_adapter_sdxl_state_dict(2), [FAMILY]).module
    with torch.no_grad():
        assert plus.subject_tokens(x).shape == (3, 1, 4, 2048)
        assert base.subject_tokens(torch.randn(3, 48)).shape == (3, 1, 4, 2048)
    assert plus.dummy_tokens is None and not plus.needs_phrases
    with pytest.raises(ValueError, match=r"takes CLIP vision projected image embeds \(width 48\) \[N, 48\], "
                                         r"got \(3, 257, 64\)"):
        base.subject_tokens(x)


def test_image_features_come_from_the_encoded_subjects():
    hidden = torch.randn(2, 3, 257, 64)
    feats = ClipFeatures(hidden=hidden, layers=(10, 23, 24), encoder="tiny", labels=("a", "b"), depth=24,
                         image_embeds=torch.randn(2, 48))
    ms = detect_and_load(ms_diffusion_state_dict(0), [FAMILY]).module
    assert torch.equal(ms.image_features(feats), hidden[:, 1])  # penultimate = layer 23 of 24
    base = detect_and_load(ip_adapter_sdxl_state_dict(0), [FAMILY]).module
    assert torch.equal(base.image_features(feats), feats.image_embeds)
    no_penultimate = ClipFeatures(hidden=hidden, layers=(10, 17, 24), encoder="tiny", labels=("a", "b"), depth=24)
    with pytest.raises(ValueError, match="layer 23 of 24 was not encoded"):
        ms.image_features(no_penultimate)
    with pytest.raises(ValueError, match="gave none"):
        base.image_features(no_penultimate)


def test_wrong_files_name_their_keys():
    sd = ms_diffusion_state_dict(0)
    bad = dict(sd)
    del bad["dummy_image_tokens"], bad["image_proj.latent_norm.bias"]
    bad["image_proj.extra"] = torch.zeros(1)
    bad["ms_adapter.3.to_v_ip.weight"] = torch.zeros(65, 2048)
    with pytest.raises(AdapterFormatError) as e:
        detect_and_load(bad, [FAMILY])
    msg = str(e.value)
    assert "ms-diffusion file: missing key dummy_image_tokens" in msg
    bad["dummy_image_tokens"] = sd["dummy_image_tokens"]
    with pytest.raises(AdapterFormatError) as e:
        detect_and_load(bad, [FAMILY])
    msg = str(e.value)
    assert "missing keys: image_proj.latent_norm.bias" in msg and "unexpected keys: image_proj.extra" in msg
    assert "wrong shapes: ms_adapter.3.to_v_ip.weight (65, 2048) (expected (64, 2048))" in msg
    gap = {k: v for k, v in sd.items() if not k.startswith("ms_adapter.5.")}
    with pytest.raises(AdapterFormatError, match="are not the odd indices 1, 3, ..., 19"):
        detect_and_load(gap, [FAMILY])
    r3 = r3_state_dict(0)
    del r3["router.anchor_logits"]
    with pytest.raises(AdapterFormatError, match="missing keys: router.anchor_logits"):
        detect_and_load(r3, [FAMILY])


def test_other_base_models_and_foreign_files_are_refused_clearly():
    sd15 = ip_base_shapes([320] * 16, embeds=1024)
    sd15 = {k: torch.empty(tuple(v[:-1]) + (768,) if k.startswith("ip_adapter") else v, device="meta")
            for k, v in sd15.items()}
    with pytest.raises(AdapterFormatError, match="made for SD 1.5; SDXL adapters take 2048"):
        detect_and_load(sd15, [FAMILY])
    hmoe = {"experts.0.0.weight": torch.zeros(4, 4), "router.0.weight": torch.zeros(2, 12)}  # a fusion file
    assert detect(hmoe) is None
    with pytest.raises(AdapterFormatError, match=r"not a known adapter format: found experts.\* \(1\), "
                                                 r"router.\* \(1\); accepted formats: troupe-r3 .*ms-diffusion "
                                                 r".*ip-adapter-plus"):
        detect_and_load(hmoe, [FAMILY])
    # an R^3 file that lost its layers is still recognised, and the missing part named
    r3 = {k: v for k, v in r3_state_dict(0).items() if not k.startswith("ms_adapter.")}
    with pytest.raises(AdapterFormatError, match=r"troupe-r3 file: no ms_adapter.\{idx\}.to_k_ip.weight keys"):
        detect_and_load(r3, [FAMILY])


def test_saved_r3_file_has_metadata_and_round_trips(tmp_path):
    m = r3_adapter(4, tokens=8, alpha=0.5)
    path = tmp_path / "r3.safetensors"
    save_sdxl_adapter(str(path), m)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "troupe-r3", "version": "1"}
    loaded = detect_and_load(read_state_dict(str(path)), [FAMILY]).module
    assert isinstance(loaded, SdxlAdapter) and float(loaded.refiner.alpha) == 0.5
    # the contract is the file: every saved weight comes back bit for bit
    saved = m.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    # the same weights give the same tokens up to float32 rounding: loaded tensors can have another memory
    # layout, so the CPU's matmul kernels may sum in another order (about 2e-6 seen on some CPUs)
    x, b, p = torch.randn(1, 5, 64), torch.rand(1, 4), torch.randn(1, 768)
    with torch.no_grad():
        torch.testing.assert_close(loaded.subject_tokens(x, b, p), m.subject_tokens(x, b, p), rtol=1e-5, atol=1e-5)


def test_the_loader_node_asks_the_sdxl_family():
    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    from comfyui_troupe.nodes.adapter import families

    assert "sdxl" in [f.name for f in families()]


def test_fp16_files_compute_tokens_in_float32(tmp_path):
    """IP-Adapter ships fp16: the image projection (once per run) computes in float32 from float32 features."""
    sd16 = {k: v.half() for k, v in ip_adapter_plus_state_dict(5).items()}
    path = write_adapter(tmp_path / "plus16.safetensors", sd16)
    m = detect_and_load(read_state_dict(str(path)), [FAMILY]).module
    assert m.layers["1"].to_k_ip.weight.dtype == torch.float16  # K/V as stored; the patch casts them per run
    x = torch.randn(2, 257, 64)
    with torch.no_grad():
        tokens = m.subject_tokens(x)
        ref = detect_and_load({k: v.float() for k, v in sd16.items()}, [FAMILY]).module.subject_tokens(x)
    assert tokens.dtype == torch.float32 and torch.allclose(tokens, ref, atol=1e-5)


def test_full_size_r3_layout_loads():
    """A full-size R^3 file (meta tensors; its size buffers real): 16 tokens x 4 levels of width 2048, 70 layers."""
    from comfyui_troupe.models.sdxl.refiner import RefinerConfig
    from comfyui_troupe.models.sdxl.resampler import ResamplerConfig

    m = SdxlAdapter("troupe-r3", layer_widths=full_sdxl_widths(), resampler=ResamplerConfig(),
                    refiner=RefinerConfig(), device="meta")
    sd = file_state_dict(m)
    sd |= {"refiner.alpha": torch.tensor(1.0), "refiner.heads": torch.tensor(32), "refiner.window": torch.tensor(4),
           "refiner.topk": torch.tensor([8, 4])}
    assert set(sd) == set(ms_diffusion_shapes(full_sdxl_widths())) | {k for k in sd if k.split(".")[0] in
                                                                      ("refiner", "router")}
    assert tuple(sd["refiner.levels.0.pos"].shape) == (1, 16, 2048)
    assert tuple(sd["router.anchor_logits"].shape) == (3, 4)
    adapter = detect_and_load(sd, [FAMILY])
    assert adapter.format == "troupe-r3" and adapter.info["tokens per subject"] == "16 x 4 levels = 64"
    assert adapter.info["cross-attention layers"] == "70 (widths 640, 1280; context 2048)"
