"""The tiny test models of tests/fixtures/tiny_models.py: real ComfyUI 0.3.75 architectures, in-process on CPU.

Later issues patch these models (SDXL attn2, FLUX double/single blocks, CLIP hierarchical layers, DINO),
so these tests pin the structure they rely on, and that the models run fast and deterministically.
"""
from __future__ import annotations

import time

import pytest
import torch
from fixtures import tiny_models as tm

SDXL_ATTN_BLOCKS = [("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
                    *[("output", i) for i in range(6)]]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on the 2-vCPU dev VM two OpenMP threads make these forwards 5-30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def comfy():
    tm.ensure_comfy()
    import comfy.clip_vision
    import comfy.model_base
    import comfy.model_management

    return comfy


@pytest.fixture(scope="module")
def sdxl(comfy):
    return tm.tiny_sdxl()


@pytest.fixture(scope="module")
def clip_vision(comfy):
    return tm.tiny_clip_vision()


@pytest.fixture(scope="module")
def dinov2(comfy):
    return tm.tiny_dinov2()


def photo(batch: int = 1, h: int = 180, w: int = 240) -> torch.Tensor:
    """A seeded random IMAGE [B, H, W, 3] in 0..1, not square, so preprocessing really resizes and crops."""
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------- ComfyUI in-process


def test_ensure_comfy_runs_on_cpu_and_twice(comfy):
    tm.ensure_comfy()  # a second call is a no-op
    import comfy.cli_args

    assert comfy.cli_args.args.cpu
    assert comfy.model_management.get_torch_device().type == "cpu"


# --------------------------------------------------------------------------- SDXL


def test_tiny_sdxl_has_sdxl_structure(sdxl, comfy):
    model = sdxl.model
    unet = model.diffusion_model
    assert isinstance(model, comfy.model_base.SDXL) and model.model_type == comfy.model_base.ModelType.EPS
    assert model.latent_format.latent_channels == 4
    assert unet.label_emb[0][0].in_features == 2816  # pooled 1280 + 6 size embeddings of 256
    with_attn = {}
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]),
                         ("output", unet.output_blocks)):
        for i, block in enumerate(blocks):
            transformers = [m for m in block if type(m).__name__ == "SpatialTransformer"]
            if transformers:
                with_attn[(name, i)] = [len(t.transformer_blocks) for t in transformers]
    assert list(with_attn) == SDXL_ATTN_BLOCKS
    assert all(depth == [1] for depth in with_attn.values())
    attn2 = unet.input_blocks[4][1].transformer_blocks[0].attn2
    assert attn2.to_k.in_features == 2048 and attn2.heads == 64 // 8  # 64 channels at input 4, 8 per head
    assert unet.middle_block[1].transformer_blocks[0].attn2.heads == 128 // 8


def test_tiny_sdxl_attn2_patches_see_every_transformer_block(sdxl):
    """Patches get ComfyUI's block ids and transformer_index 0..10 (input 4,5,7,8 / middle / output 0-5)."""
    seen = []

    def record(n, context, value, extra_options):
        seen.append((extra_options["block"], extra_options["transformer_index"], tuple(context.shape)))
        return n, context, value

    m = sdxl.clone()
    m.set_model_attn2_patch(record)
    out = tm.sample(m, tm.sdxl_conditioning(0, width=128, height=128), tm.sdxl_conditioning(1),
                    torch.zeros(1, 4, 16, 16), steps=1, cfg=1.0)
    assert out.shape == (1, 4, 16, 16)
    assert [s[0] for s in seen] == SDXL_ATTN_BLOCKS  # cfg 1: one pass, no uncond
    assert [s[1] for s in seen] == list(range(11))
    assert {s[2] for s in seen} == {(1, 77, 2048)}
    assert not sdxl.model_options.get("transformer_options", {}).get("patches")  # the clone took the patch


def test_tiny_sdxl_samples_fast_and_deterministically(sdxl):
    pos, neg = tm.sdxl_conditioning(0, width=128, height=128), tm.sdxl_conditioning(1, width=128, height=128)
    latent = torch.zeros(1, 4, 16, 16)
    tm.sample(sdxl, pos, neg, latent, steps=1, cfg=5.0)  # warm-up (first call sets up ComfyUI's caches)
    start = time.perf_counter()
    a = tm.sample(sdxl, pos, neg, latent, steps=4, cfg=5.0, scheduler="normal", seed=3)
    elapsed = time.perf_counter() - start
    b = tm.sample(sdxl, pos, neg, latent, steps=4, cfg=5.0, scheduler="normal", seed=3)
    assert a.shape == (1, 4, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert elapsed < 8.0, f"4 CFG steps of the tiny SDXL took {elapsed:.1f} s"


def test_sdxl_conditioning_has_what_encode_adm_needs(sdxl):
    cond = tm.sdxl_conditioning(seed=4, batch=2, width=512, height=768)
    context, extra = cond[0]
    assert context.shape == (2, 77, 2048) and extra["pooled_output"].shape == (2, 1280)
    adm = sdxl.model.encode_adm(**extra)
    assert adm.shape == (2, 2816)
    assert torch.equal(tm.sdxl_conditioning(seed=4, batch=2)[0][0], context)  # seeded


# --------------------------------------------------------------------------- FLUX


@pytest.mark.parametrize("schnell", [False, True], ids=["dev", "schnell"])
def test_tiny_flux_structure_and_block_replacement(comfy, schnell):
    """2 double + 2 single blocks, each reachable through patches_replace['dit'] as on real FLUX."""
    patcher = tm.tiny_flux(schnell=schnell)
    model = patcher.model
    dit = model.diffusion_model
    assert (len(dit.double_blocks), len(dit.single_blocks)) == (2, 2)
    assert (dit.hidden_size, dit.num_heads, dit.params.axes_dim) == (64, 2, [8, 12, 12])
    assert model.latent_format.latent_channels == 16
    expected_type = comfy.model_base.ModelType.FLOW if schnell else comfy.model_base.ModelType.FLUX
    assert model.model_type == expected_type
    assert isinstance(dit.guidance_in, torch.nn.Identity) == schnell

    calls = []

    def replace(kind: str, i: int):
        def block(args, extra):
            calls.append((kind, i, args["img"].shape[1], args["transformer_options"]["block_index"]))
            return extra["original_block"](args)
        return block

    m = patcher.clone()
    for i in range(2):
        m.set_model_patch_replace(replace("double_block", i), "dit", "double_block", i)
        m.set_model_patch_replace(replace("single_block", i), "dit", "single_block", i)
    tokens = 24
    pos = tm.flux_conditioning(0, tokens=tokens, guidance=None if schnell else 3.5)
    out = tm.sample(m, pos, tm.flux_conditioning(1, tokens=tokens), torch.zeros(1, 16, 16, 16),
                    steps=1, cfg=1.0)
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()
    image_tokens = (16 // 2) * (16 // 2)
    assert calls == [("double_block", 0, image_tokens, 0), ("double_block", 1, image_tokens, 1),
                     ("single_block", 0, tokens + image_tokens, 0), ("single_block", 1, tokens + image_tokens, 1)]


def test_tiny_flux_samples_fast_with_guidance_and_with_real_cfg(comfy):
    dev, schnell = tm.tiny_flux(), tm.tiny_flux(schnell=True)
    latent = torch.zeros(1, 16, 16, 16)
    start = time.perf_counter()
    a = tm.sample(dev, tm.flux_conditioning(0, guidance=3.5), tm.flux_conditioning(1), latent, steps=4, cfg=1.0)
    b = tm.sample(schnell, tm.flux_conditioning(0, guidance=None), tm.flux_conditioning(1, guidance=None),
                  latent, steps=4, cfg=3.0)
    elapsed = time.perf_counter() - start
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # the guidance embedding is live on dev: another guidance value, another result
    c = tm.sample(dev, tm.flux_conditioning(0, guidance=1.0), tm.flux_conditioning(1), latent, steps=4, cfg=1.0)
    assert not torch.allclose(a, c)
    assert elapsed < 8.0, f"8 tiny FLUX steps took {elapsed:.1f} s"


def test_flux_conditioning_dims():
    context, extra = tm.flux_conditioning(seed=2, batch=3, tokens=256, guidance=4.0)[0]
    assert context.shape == (3, 256, 4096) and extra["pooled_output"].shape == (3, 768)
    assert extra["guidance"] == 4.0


# --------------------------------------------------------------------------- CLIP vision


def test_tiny_clip_vision_has_24_layers_of_hidden_states(clip_vision, comfy):
    """intermediate_output='all' is [B, 24, 257, D]; an int picks one layer of it; encode_image works."""
    vm = clip_vision.model.vision_model
    assert len(vm.encoder.layers) == 24 and clip_vision.image_size == 224
    pixels = comfy.clip_vision.clip_preprocess(photo(2), size=224)
    with torch.inference_mode():
        last, every, embeds, _ = clip_vision.model(pixel_values=pixels, intermediate_output="all")
        _, layer10, _, _ = clip_vision.model(pixel_values=pixels, intermediate_output=9)
        out = clip_vision.encode_image(photo(2))
    assert every.shape == (2, 24, 257, 64) and last.shape == (2, 257, 64) and embeds.shape == (2, 48)
    assert torch.equal(every[:, -1], last) and torch.equal(every[:, 9], layer10)
    assert not torch.allclose(every[:, 9], every[:, 16])
    assert out["last_hidden_state"].shape == (2, 257, 64) and out["image_embeds"].shape == (2, 48)
    assert torch.allclose(out["penultimate_hidden_states"], every[:, -2])


def test_tiny_clip_vision_matches_hf_transformers(clip_vision, comfy):
    """Real key layout: HF CLIPVisionModelWithProjection takes the weights; ComfyUI all[:, L-1] is HF hidden_states[L]."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    c = clip_vision.config
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"], num_hidden_layers=24,
        num_attention_heads=c["num_attention_heads"], image_size=224, patch_size=14,
        projection_dim=c["projection_dim"], hidden_act="quick_gelu")).eval()
    missing, unexpected = hf.load_state_dict({k: v.float() for k, v in clip_vision.get_sd().items()}, strict=False)
    assert not unexpected and set(missing) <= {"vision_model.embeddings.position_ids"}
    pixels = comfy.clip_vision.clip_preprocess(photo(1), size=224)
    with torch.inference_mode():
        _, every, embeds, _ = clip_vision.model(pixel_values=pixels, intermediate_output="all")
        ref = hf(pixel_values=pixels, output_hidden_states=True)
    for layer in (10, 17, 24):
        torch.testing.assert_close(every[:, layer - 1], ref.hidden_states[layer], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeds, ref.image_embeds, atol=1e-4, rtol=1e-4)


def test_clip_vision_file_round_trip(clip_vision, tmp_path):
    path = tm.write_vision_model(tmp_path / "tiny_clip_vision.safetensors", clip_vision)
    sd = tm.read_checkpoint(path)
    for key in ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.class_embedding",
                "vision_model.encoder.layers.23.self_attn.q_proj.weight", "vision_model.post_layernorm.weight",
                "visual_projection.weight"):
        assert key in sd, key
    again = tm.load_vision_model(path)
    original = clip_vision.get_sd()
    assert again.get_sd().keys() == original.keys()
    assert all(torch.equal(again.get_sd()[k], original[k]) for k in original)


# --------------------------------------------------------------------------- DINOv2 / DINOv3


def test_tiny_dinov2_forward(dinov2):
    assert type(dinov2.model).__name__ == "Dinov2Model" and dinov2.image_size == 518
    with torch.inference_mode():
        out = dinov2.encode_image(photo(1))
    assert out["last_hidden_state"].shape == (1, 1370, 64)  # 37 x 37 patches + CLS
    assert out["image_embeds"].shape == (1, 64) and torch.isfinite(out["last_hidden_state"]).all()
    assert "encoder.layer.5.layer_scale2.lambda1" in dinov2.get_sd()


def test_hf_dinov2_folder_holds_the_same_model(comfy, tmp_path):
    """Same weights as tiny_dinov2 in an HF folder; ComfyUI intermediate_output=k is HF hidden_states[k + 1]."""
    from transformers import Dinov2Model

    folder = tm.tiny_hf_dinov2_folder(tmp_path / "dinov2", layers=2)
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    ours = tm.tiny_dinov2(layers=2)
    hf = Dinov2Model.from_pretrained(folder).eval()
    pixels = comfy.clip_vision.clip_preprocess(photo(1), size=518, mean=ours.image_mean, std=ours.image_std)
    with torch.inference_mode():
        last, layer1, pooled, _ = ours.model(pixel_values=pixels, intermediate_output=0)
        ref = hf(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(last, ref.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer1, ref.hidden_states[1], atol=1e-4, rtol=1e-4)


def test_hf_dinov3_folder_loads(tmp_path):
    from transformers import AutoModel

    folder = tm.tiny_hf_dinov3_folder(tmp_path / "dinov3")
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "DINOv3ViTModel" and model.config.num_register_tokens == 4
    with torch.inference_mode():
        out = model(pixel_values=torch.randn(1, 3, 224, 224))
    assert out.last_hidden_state.shape == (1, 1 + 4 + 14 * 14, 64)  # CLS | 4 registers | patches
    again = AutoModel.from_pretrained(tm.tiny_hf_dinov3_folder(tmp_path / "again"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# --------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("channels", [4, 16])
def test_tiny_vae_round_trips_shapes(comfy, channels):
    vae = tm.tiny_vae(channels)
    assert vae.latent_channels == channels and vae.spacial_compression_encode() == 8
    with torch.inference_mode():
        z = vae.encode(photo(2, 64, 96))
        x = vae.decode(z)
    assert z.shape == (2, channels, 8, 12)
    assert x.shape == (2, 64, 96, 3) and x.min() >= 0 and x.max() <= 1


def test_tiny_vae_state_dict_uses_sd_vae_keys(comfy):
    sd = tm.tiny_vae_state_dict()
    for key in ("encoder.conv_in.weight", "encoder.down.3.block.1.conv2.weight", "encoder.mid.attn_1.q.weight",
                "quant_conv.weight", "post_quant_conv.weight", "decoder.up.0.block.2.norm1.weight",
                "decoder.conv_out.weight"):
        assert key in sd, key
    assert sd["decoder.conv_in.weight"].shape[1] == 4


# --------------------------------------------------------------------------- checkpoints and seeds


def test_checkpoint_round_trip_gives_identical_weights(sdxl, tmp_path):
    sd = sdxl.model.diffusion_model.state_dict()
    path = tm.write_checkpoint(tmp_path / "tiny_sdxl.safetensors", sd, metadata={"arch": "tiny-sdxl"})
    loaded = tm.read_checkpoint(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    rebuilt = tm.tiny_sdxl(state_dict=loaded).model.diffusion_model.state_dict()
    assert all(torch.equal(rebuilt[k], sd[k]) for k in sd)
    vae_sd = tm.tiny_vae_state_dict(16)
    vae = tm.tiny_vae(16, state_dict=tm.read_checkpoint(tm.write_checkpoint(tmp_path / "vae.safetensors", vae_sd)))
    assert all(torch.equal(vae.first_stage_model.state_dict()[k], v) for k, v in vae_sd.items())


def test_seeds_make_the_weights(comfy):
    a, b = tm.tiny_flux(seed=1), tm.tiny_flux(seed=1)
    c = tm.tiny_flux(seed=2)
    w = lambda p: p.model.diffusion_model.img_in.weight
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))
    assert w(a).std().item() == pytest.approx(0.02, rel=0.1)
    # the RMSNorm gain is ``scale`` in 0.3.75's QKNorm and ``weight`` in newer ComfyUI's operations.RMSNorm
    (norm,) = a.model.diffusion_model.double_blocks[0].img_attn.norm.query_norm.parameters()
    assert torch.equal(norm, torch.ones_like(norm))
    with pytest.raises(ValueError, match="does not fit"):
        tm.tiny_flux(schnell=True, state_dict=a.model.diffusion_model.state_dict())  # dev has guidance_in
