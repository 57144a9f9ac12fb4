"""TroupeFidelity and its model nodes in-process: ComfyUI's CLIP vision + CLIP text, OpenCLIP from models/openclip,
DINO from models/dino or Load CLIP Vision; each number checked against the backbone called by hand."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures.tiny_models import ensure_comfy, tiny_clip_vision, tiny_dinov2, tiny_hf_dinov2_folder
from fixtures.tiny_openclip import tiny_openclip_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
PROJECTION = 48  # tiny_clip_vision's projection width


@pytest.fixture(scope="module")
def nodes():
    ensure_comfy()
    from comfyui_troupe.nodes import fidelity, image_text

    return fidelity, image_text


@pytest.fixture(scope="module")
def clip_vision(nodes):
    return tiny_clip_vision(4, seed=2)


@pytest.fixture(scope="module")
def clip_text(nodes):
    """ComfyUI's SDXL CLIP (clip_l 48 wide = the vision projection, clip_g 16) from the test node pack."""
    path = Path(__file__).resolve().parents[1] / "custom_nodes" / "troupe_test_nodes" / "clip_nodes.py"
    spec = importlib.util.spec_from_file_location("troupe_test_clip_nodes_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_sdxl_clip(seed=3, width_l=PROJECTION, width_g=16)


def hand_square(crop: torch.Tensor, size: int) -> torch.Tensor:
    """Pad [h, w, 3] to a centred white square and resize -> [1, 3, size, size] (written out, not imported)."""
    h, w = crop.shape[:2]
    side = max(h, w)
    canvas = torch.ones(side, side, 3)
    canvas[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
    x = F.interpolate(canvas.permute(2, 0, 1)[None], size=(size, size), mode="bicubic", align_corners=False,
                      antialias=True)
    return x.clamp(0, 1)


def unit(x: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def blocks(seed: int, h: int, w: int) -> torch.Tensor:
    cells = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(cells, size=(h, w), mode="nearest")[0].permute(1, 2, 0).contiguous()


def scene():
    """A 128x256 image, two half boxes, two subjects (one with two views, one with a mask)."""
    from comfyui_troupe.models.layout.layout import Layout, Region
    from comfyui_troupe.models.layout.subject import Subject

    image = torch.cat([blocks(1, 128, 128), blocks(2, 128, 128)], 1)[None]
    layout = Layout(256, 128, (Region(box=(0.0, 0.0, 0.5, 1.0)), Region(box=(0.5, 0.0, 1.0, 1.0))))
    mask = torch.zeros(1, 90, 70)
    mask[:, 10:80, 5:60] = 1.0
    subjects = (Subject(image=torch.stack([blocks(3, 100, 80), blocks(4, 100, 80)]), label="cat"),
                Subject(image=blocks(5, 90, 70)[None], label="dog", mask=mask))
    return image, layout, subjects


def reference_crops_by_hand(subjects):
    out = []
    for s in subjects:
        for v in range(s.image.shape[0]):
            img = s.image[v]
            if s.mask is not None:
                m = s.mask[0]
                rows, cols = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
                t, b, l, r = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                a = m[t:b, l:r, None]
                img = img[t:b, l:r] * a + (1 - a)
            out.append((s.label, img))
    return out


# --------------------------------------------------------------------------- ComfyUI CLIP vision + CLIP text


def test_comfy_clip_i_and_clip_t_match_the_towers_called_by_hand(nodes, clip_vision, clip_text):
    fidelity, image_text = nodes
    model = image_text.TroupeImageTextCLIP.execute(clip_vision, clip_text).result[0]
    assert model.metrics() == ("clip_i", "clip_t") and "clip_l" in model.text.name
    image, layout, subjects = scene()
    prompt = "a cat and a dog on the grass"
    out = fidelity.TroupeFidelity.execute(image, subjects, layout, model, prompt, "pad", "none", 224)
    heatmap, text = out.result
    result = json.loads(text)

    def embed(crops):  # ComfyUI's preprocessing written out: 8-bit rounding, CLIP mean/std, projected embeds
        x = torch.cat([hand_square(c, 224) for c in crops])
        x = (torch.round(x * 255) / 255 - CLIP_MEAN) / CLIP_STD
        with torch.no_grad():
            return unit(clip_vision.model(pixel_values=x)[2])

    regions = embed([image[0, :, :128], image[0, :, 128:]])
    refs = reference_crops_by_hand(subjects)
    views = embed([c for _, c in refs])
    cols = [views[[i for i, (label, _) in enumerate(refs) if label == s.label]] for s in subjects]
    expected = [[float((cols[s] @ regions[r]).mean()) for s in range(2)] for r in range(2)]
    np.testing.assert_allclose(result["matrices"]["clip_i"]["matrix"], expected, atol=2e-5)
    assert [s["clip_i"] for s in result["subjects"]] == pytest.approx([expected[0][0], expected[1][1]], abs=2e-5)
    assert result["subjects"][0]["clip_i_leakage"] == {"dog": pytest.approx(expected[0][1], abs=2e-5)}

    # CLIP-T: clip_l's final-layer-normed EOS token times text_projection (what CLIP's text tower returns)
    clip_l = clip_text.cond_stage_model.clip_l
    seen = []
    hook = clip_l.transformer.text_model.final_layer_norm.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        tokens = clip_text.tokenize(prompt)["l"]
        with torch.inference_mode():
            clip_l.encode_token_weights(tokens)
    finally:
        hook.remove()
    eos = [t for t, _ in tokens[0]].index(49407)
    text_emb = seen[-1][0, eos].float() @ clip_l.transformer.text_projection.weight.t().float()
    whole = embed([image[0]])[0]
    assert result["clip_t"] == pytest.approx(float(whole @ unit(text_emb)), abs=2e-5)
    assert result["backbones"]["clip_image"].startswith("ComfyUI CLIP vision (4 layers, width 64, projection 48")
    assert result["backbones"]["clip_text"] == "ComfyUI CLIP text clip_l (projection 48)"
    assert "dino" not in result["matrices"] and heatmap.ndim == 4 and heatmap.shape[-1] == 3
    assert out.ui["text"] == (text,) and out.ui["images"][0]["type"] == "temp"


def test_clip_vision_alone_measures_clip_i_only(nodes, clip_vision):
    fidelity, image_text = nodes
    model = image_text.comfy_image_text(clip_vision)
    image, layout, subjects = scene()
    result = json.loads(fidelity.TroupeFidelity.execute(image, subjects, layout, model, "a prompt", "pad", "none",
                                                        224).result[1])
    assert result["clip_t"] is None and "clip_text" not in result["backbones"] and "clip_i" in result["matrices"]


# --------------------------------------------------------------------------- DINO


def test_dino_from_models_dino_is_the_cls_token_of_the_hf_forward(nodes, clip_vision, tmp_path, monkeypatch):
    import folder_paths
    from transformers import Dinov2Model

    fidelity, image_text = nodes
    folder = tiny_hf_dinov2_folder(tmp_path / "dino" / "tiny-dinov2", layers=2)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dino", ([str(tmp_path / "dino")], set()))
    assert fidelity.TroupeFidelity.validate_inputs("tiny-dinov2") is True
    assert "no folder 'gone'" in fidelity.TroupeFidelity.validate_inputs("gone")
    image, layout, subjects = scene()
    model = image_text.comfy_image_text(clip_vision)
    result = json.loads(fidelity.TroupeFidelity.execute(image, subjects, layout, model, "", "pad", "tiny-dinov2",
                                                        112).result[1])
    hf = Dinov2Model.from_pretrained(folder).eval()

    def cls(crops):
        x = (torch.cat([hand_square(c, 112) for c in crops]) - IMAGENET_MEAN) / IMAGENET_STD
        with torch.no_grad():
            return unit(hf(pixel_values=x).last_hidden_state[:, 0])

    regions = cls([image[0, :, :128], image[0, :, 128:]])
    refs = reference_crops_by_hand(subjects)
    views = cls([c for _, c in refs])
    expected = [[float((views[:2] @ regions[r]).mean()), float(views[2] @ regions[r])] for r in range(2)]
    np.testing.assert_allclose(result["matrices"]["dino"]["matrix"], expected, atol=2e-5)
    assert result["backbones"]["dino"] == "tiny-dinov2 (dinov2), 112 px, CLS token"


def test_dino_from_load_clip_vision_and_a_real_msbench_case(nodes, clip_vision, msbench):
    """MS-Bench photos pasted into MS-Bench boxes: own beats every other subject in CLIP-I and DINO."""
    from fixtures.pasted_msbench import pasted_case

    from comfyui_troupe.models.layout.subject import Subject

    fidelity, image_text = nodes
    image, layout, refs = pasted_case(msbench, "object_object_object")
    subjects = tuple(Subject(image=r.images, label=r.label) for r in refs)
    result = json.loads(fidelity.TroupeFidelity.execute(image[None], subjects, layout,
                                                        image_text.comfy_image_text(clip_vision), "", "pad", "none",
                                                        224, dino_vision=tiny_dinov2(2, seed=3)).result[1])
    for name in ("clip_i", "dino"):
        m = np.array(result["matrices"][name]["matrix"])
        for i in range(3):
            assert m[i, i] > max(m[i, j] for j in range(3) if j != i), (name, m)
        assert all(x > 0 for x in result["matrices"][name]["margin"])
    assert result["backbones"]["dino"].startswith("DINOv2 (ComfyUI, 2 layers, width 64, 518 px)")


# --------------------------------------------------------------------------- OpenCLIP from models/openclip


def test_openclip_loads_from_models_openclip_only(nodes, tmp_path, monkeypatch):
    import folder_paths

    fidelity, image_text = nodes
    root = tmp_path / "openclip"
    tiny_openclip_folder(root / "tiny-vit")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "openclip", ([str(root)], set()))
    assert image_text.openclip_choices() == ["tiny-vit"]  # the folder, not the weights inside it
    assert image_text.TroupeLoadOpenCLIP.validate_inputs("tiny-vit") is True
    assert "no OpenCLIP folder or file 'ViT-L-14'" in image_text.TroupeLoadOpenCLIP.validate_inputs("ViT-L-14")
    out = image_text.TroupeLoadOpenCLIP.execute("tiny-vit", "")
    model = out.result[0]
    assert model.metrics() == ("clip_i", "clip_t") and "metrics: clip_i, clip_t" in out.ui.as_dict()["text"][0]
    image, layout, subjects = scene()
    result = json.loads(fidelity.TroupeFidelity.execute(image, subjects, layout, model, "a cat", "center", "none",
                                                        224).result[1])
    assert result["crop"] == "center" and result["backbones"]["clip_image"] == "OpenCLIP tiny-vit, 64 px"
    assert result["clip_t"] is not None
    (root / "weights-only").mkdir()
    (root / "weights-only" / "open_clip_config.json").write_text((root / "tiny-vit" / "open_clip_config.json").read_text())
    with pytest.raises(ValueError, match=r"TroupeLoadOpenCLIP: input 'model_name': weights-only has "
                                         r"open_clip_config.json but no weights"):
        image_text.TroupeLoadOpenCLIP.execute("weights-only", "")


# --------------------------------------------------------------------------- refusals


def test_refusals_name_the_node_input_and_fix(nodes, clip_vision, clip_text):
    from comfyui_troupe.models.layout.layout import Layout, Region

    fidelity, image_text = nodes
    model = image_text.comfy_image_text(clip_vision)
    image, layout, subjects = scene()
    with pytest.raises(ValueError, match=r"TroupeFidelity: input 'layout': 2 regions but 1 subjects"):
        fidelity.TroupeFidelity.execute(image, subjects[:1], layout, model, "", "pad", "none", 224)
    square = Layout(256, 256, layout.regions)
    with pytest.raises(ValueError, match=r"TroupeFidelity: input 'image': the image is 256x128 but the layout canvas "
                                         r"is 256x256"):
        fidelity.TroupeFidelity.execute(image, subjects, square, model, "", "pad", "none", 224)
    with pytest.raises(ValueError, match=r"TroupeFidelity: both 'dino_vision' and 'dino_model' \(some-folder\)"):
        fidelity.TroupeFidelity.execute(image, subjects, layout, model, "", "pad", "some-folder", 224,
                                        dino_vision=tiny_dinov2(2))
    with pytest.raises(ValueError, match=r"TroupeFidelity: input 'dino_vision': got a CLIPVisionModelProjection, "
                                         r"not a DINOv2"):
        fidelity.TroupeFidelity.execute(image, subjects, layout, model, "", "pad", "none", 224,
                                        dino_vision=clip_vision)
    with pytest.raises(ValueError, match=r"TroupeImageTextCLIP: input 'clip_vision': this is a DINOv2 model"):
        image_text.comfy_image_text(tiny_dinov2(2))
    wide = tiny_clip_vision(2, seed=4)
    with torch.no_grad():  # a 64-wide projection that no CLIP text tower of the tiny SDXL CLIP matches
        wide.model.visual_projection = torch.nn.Linear(64, 64, bias=False)
    with pytest.raises(ValueError, match=r"TroupeImageTextCLIP: input 'clip': no CLIP text tower projects to the CLIP "
                                         r"vision width 64 \(found: clip_l 48, clip_g 16\)"):
        image_text.comfy_image_text(wide, clip_text)
    mask_only = Layout(256, 128, (Region(box=(0.0, 0.0, 0.5, 1.0)), Region(mask=torch.zeros(128, 256))))
    with pytest.raises(ValueError, match=r"TroupeFidelity: region 2: its mask covers no pixel"):
        fidelity.TroupeFidelity.execute(image, subjects, mask_only, model, "", "pad", "none", 224)
