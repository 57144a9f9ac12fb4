"""TroupeEncodeSubjects in-process (Sec. 4.2 of 004): hierarchical CLIP features of MS-Bench subjects.

The tiny 24-layer CLIP vision tower is ComfyUI's own ClipVisionModel in the real (HF) key layout; the
ground truth is an independent forward with ``intermediate_output="all"``, which stacks every layer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.tiny_models import ensure_comfy, load_vision_model, tiny_clip_vision, write_vision_model
from PIL import Image

WIDTH = 64  # tiny_clip_vision's width


@pytest.fixture(scope="module")
def enc():
    ensure_comfy()
    from comfyui_troupe.nodes import encoding

    return encoding


@pytest.fixture(scope="module")
def clip24(tmp_path_factory):
    """Written to disk in ComfyUI's key layout and read back: what a user's file would load into."""
    path = write_vision_model(tmp_path_factory.mktemp("cv") / "tiny_vitl14.safetensors", tiny_clip_vision(24))
    return load_vision_model(path)


def photo(msbench, rel: str) -> torch.Tensor:
    img = Image.open(msbench / rel).convert("RGB")
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def subjects(msbench):
    from comfyui_troupe.models.layout.subject import Subject

    dog = photo(msbench, "images/living/dog.jpg")
    cat = photo(msbench, "images/living/cat.jpg")
    h, w = cat.shape[1:3]
    mask = torch.zeros(1, h, w)
    mask[:, h // 6: h * 5 // 6, w // 4: w * 3 // 4] = 1  # a tall box around the cat: crop, blank, pad
    return Subject(image=dog, label="dog"), Subject(image=cat, label="cat", mask=mask)


def reference_pixels(cv, subjects) -> torch.Tensor:
    """The same white-background square crops, preprocessed the way ComfyUI's encode_image does."""
    import comfy.clip_vision

    from comfyui_troupe.models.encoding.clip_features import subject_batch

    batch = subject_batch([s.image[0] for s in subjects], [None if s.mask is None else s.mask[0] for s in subjects],
                          cv.image_size)
    pixels = comfy.clip_vision.clip_preprocess(batch, size=cv.image_size, mean=cv.image_mean, std=cv.image_std,
                                               crop=False).float()
    # the node's batch also holds IP-Adapter's unconditional image (all-zero after normalisation) as its last row
    return torch.cat([pixels, torch.zeros_like(pixels[:1])])


@pytest.mark.parametrize("layers,chosen", [("auto", (10, 17, 24)), ("1, 12,24", (1, 12, 24))])
def test_hierarchical_features_are_the_requested_hidden_states(enc, clip24, subjects, layers, chosen):
    feats = enc.encode_subjects(clip24, subjects, layers)
    assert feats.layers == chosen and feats.labels == ("dog", "cat")
    assert feats.hidden.shape == (2, 3, 257, WIDTH) and feats.hidden.dtype == torch.float32
    with torch.inference_mode():
        _, every, pooled = clip24.model(pixel_values=reference_pixels(clip24, subjects), intermediate_output="all")[:3]
    assert every.shape == (3, 24, 257, WIDTH)
    uncond, every, pooled = every[2:], every[:2], pooled.float()
    expected = every[:, [c - 1 for c in chosen]].float()
    torch.testing.assert_close(feats.hidden, expected, rtol=0, atol=0)
    # without fusion the adapters attend to the high layer's full tokens (CLS + patches)
    assert torch.equal(feats.tokens(), feats.hidden[:, -1])
    assert feats.encoder == "24 layers, width 64, 224 px" and feats.depth == 24
    # the projected pooled output (IP-Adapter base files take it) and layer lookup by number
    torch.testing.assert_close(feats.image_embeds, pooled[:2], rtol=0, atol=0)
    assert feats.image_embeds.shape == (2, 48)
    assert torch.equal(feats.layer(chosen[1]), expected[:, 1])
    # the penultimate layer (MS-Diffusion, IP-Adapter Plus) is always there; other layers must be asked for
    assert torch.equal(feats.layer(-2), every[:, 22].float()) and torch.equal(feats.penultimate, every[:, 22].float())
    missing = next(k for k in (2, 3) if k not in chosen)
    with pytest.raises(ValueError, match=rf"layer {missing} of 24 was not encoded .* set TroupeEncodeSubjects' "
                                         rf"'layers' to include {missing}"):
        feats.layer(missing)
    # IP-Adapter's unconditional image prompt: an all-zero normalised image through the same tower
    torch.testing.assert_close(feats.uncond_penultimate, uncond[:, 22].float(), rtol=0, atol=0)
    torch.testing.assert_close(feats.uncond_image_embeds, pooled[2:], rtol=0, atol=0)
    with torch.inference_mode():  # and it is what a forward of that image alone gives
        alone = clip24.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1].float()
    torch.testing.assert_close(feats.uncond_penultimate, alone, rtol=1e-5, atol=1e-5)


def test_all_subjects_go_through_one_batched_forward(enc, clip24, subjects):
    calls = []
    hook = clip24.model.vision_model.embeddings.register_forward_pre_hook(
        lambda _m, args, kwargs=None: calls.append(args[0].shape[0]))
    try:
        enc.encode_subjects(clip24, subjects)
    finally:
        hook.remove()
    assert calls == [3]  # two subjects and the all-zero unconditional image


def test_the_mask_crops_and_blanks_the_background(enc, clip24, subjects):
    """Changing pixels outside the cat's mask changes nothing; changing them inside does."""
    from comfyui_troupe.models.layout.subject import Subject

    _dog, cat = subjects
    outside = cat.image.clone()
    outside[:, :5] = 0.0  # the top rows lie outside the mask
    inside = cat.image.clone()
    h, w = inside.shape[1:3]
    inside[:, h // 2, w // 2] = 0.0
    base = enc.encode_subjects(clip24, (cat,)).hidden
    same = enc.encode_subjects(clip24, (Subject(image=outside, label="cat", mask=cat.mask),)).hidden
    other = enc.encode_subjects(clip24, (Subject(image=inside, label="cat", mask=cat.mask),)).hidden
    assert torch.equal(base, same)
    assert not torch.equal(base, other)


def test_fusion_runs_once_at_encoding(enc, clip24, subjects):
    from comfyui_troupe.models.encoding.hmoe import HMoE, HMoEConfig

    torch.manual_seed(0)
    fusion = HMoE(HMoEConfig(in_dim=WIDTH, out_dim=32, router_hidden=16)).eval()
    feats = enc.encode_subjects(clip24, subjects, fusion=fusion)
    assert feats.fused.shape == (2, 257, 32)
    torch.testing.assert_close(feats.routed.sum(-1), torch.ones(2))
    with torch.inference_mode():
        ref = fusion(feats.hidden)
    torch.testing.assert_close(feats.fused, ref.fused)
    assert torch.equal(feats.tokens(), feats.fused)


def test_clear_errors_name_the_node_input_and_fix(enc, clip24, subjects):
    from comfyui_troupe.models.encoding.hmoe import HMoE, HMoEConfig

    short = tiny_clip_vision(layers=12)
    with pytest.raises(ValueError, match=r"TroupeEncodeSubjects: input 'layers': layer 17 does not exist; "
                                         r"this encoder has layers 1..12"):
        enc.encode_subjects(short, subjects, "10,17,24")
    assert enc.encode_subjects(short, subjects[:1]).layers == (5, 8, 12)  # auto scales to the depth
    with pytest.raises(ValueError, match=r"input 'layers': expected 'auto' or three numbers like '10,17,24'"):
        enc.encode_subjects(clip24, subjects, "low,mid,high")
    with pytest.raises(ValueError, match=r"input 'layers': expected three layers \(low, mid, high\)"):
        enc.encode_subjects(clip24, subjects, "10,24")
    wrong = HMoE(HMoEConfig(in_dim=1024, out_dim=32, router_hidden=16))
    with pytest.raises(ValueError, match=r"input 'fusion': the file was trained for encoder width 1024 but this CLIP vision "
                                         r"model has width 64"):
        enc.encode_subjects(clip24, subjects, fusion=wrong)
    with pytest.raises(ValueError, match=r"TroupeEncodeSubjects: input 'clip_vision' is not a CLIP/SigLIP vision"):
        enc.encode_subjects(object(), subjects)


def test_fusion_file_loads_from_models_troupe_and_names_bad_keys(enc, tmp_path, monkeypatch):
    import folder_paths
    from safetensors.torch import save_file

    from comfyui_troupe.models.encoding.hmoe import HMoE, HMoEConfig, hmoe_metadata

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "troupe", ([str(tmp_path)], {".safetensors"}))
    torch.manual_seed(1)
    module = HMoE(HMoEConfig(in_dim=WIDTH, out_dim=32, router_hidden=16))
    save_file(module.state_dict(), str(tmp_path / "hmoe_tiny.safetensors"), metadata=hmoe_metadata((10, 17, 24)))
    assert enc.TroupeLoadFusion.validate_inputs("hmoe_tiny.safetensors") is True
    assert "no file 'gone.safetensors' in models/troupe" in enc.TroupeLoadFusion.validate_inputs("gone.safetensors")
    loaded = enc.TroupeLoadFusion.execute("hmoe_tiny.safetensors").result[0]
    for k, v in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    bad = dict(module.state_dict())
    bad.pop("router.2.bias")
    bad["extra.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"TroupeLoadFusion: input 'fusion_name': bad.safetensors: .*"
                                         r"missing keys: router.2.bias \| unexpected keys: extra.weight"):
        enc.TroupeLoadFusion.execute("bad.safetensors")
