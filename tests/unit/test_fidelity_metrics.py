"""Fidelity metrics (CLIP-I, DINO, leakage, identity margin, CLIP-T) against independent computations on tiny encoders.

The tiny OpenCLIP model is open_clip's own CLIP class at a tiny config, written as the hubs publish one and
loaded through ``local-dir:``; the independent path crops, pads, resizes and normalises by hand and calls
``encode_image`` / ``encode_text`` directly.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures.pasted_msbench import pasted_case
from fixtures.tiny_openclip import tiny_openclip_folder

from comfyui_troupe.evaluation.backbones import ImageTextModel, ImageTower
from comfyui_troupe.evaluation.crops import box_slice, prepare, region_crops
from comfyui_troupe.evaluation.metrics import SubjectMatrix, SubjectRefs, score_image
from comfyui_troupe.evaluation.openclip import OpenClipError, openclip_model
from comfyui_troupe.models.layout.layout import Layout, Region

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched: the model is a local folder
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # written out, not imported
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
SIZE = 64  # the tiny OpenCLIP's input side


@pytest.fixture(scope="module")
def openclip(tmp_path_factory) -> ImageTextModel:
    return openclip_model(str(tiny_openclip_folder(tmp_path_factory.mktemp("oc") / "tiny-openclip")))


@pytest.fixture(scope="module")
def raw_openclip(tmp_path_factory):
    """The same weights through open_clip's own API only (the independent path)."""
    import open_clip

    folder = tiny_openclip_folder(tmp_path_factory.mktemp("oc") / "tiny-openclip-raw")
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    return model, open_clip.get_tokenizer(f"local-dir:{folder}")


def hand_square(crop: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Pad [h, w, 3] to a centred white square, resize (bicubic, antialiased) -> [1, 3, size, size]."""
    h, w = crop.shape[:2]
    side = max(h, w)
    canvas = torch.ones(side, side, 3)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = crop
    x = canvas.permute(2, 0, 1)[None]
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def hand_embed(model, crops) -> np.ndarray:
    x = torch.cat([hand_square(c) for c in crops])
    with torch.no_grad():
        e = model.encode_image((x - OPENAI_MEAN) / OPENAI_STD).double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def two_box_layout(w: int = 256, h: int = 128) -> Layout:
    return Layout(w, h, (Region(box=(0.0, 0.0, 0.5, 1.0), label="a"), Region(box=(0.5, 0.0, 1.0, 1.0), label="b")))


def noise(seed: int, *shape) -> torch.Tensor:
    """Blocks of random colours (a 4x4 grid, nearest-upsampled): distinct enough for a random tiny encoder."""
    *lead, h, w, c = shape
    cells = torch.rand(*lead, c, 4, 4, generator=torch.Generator().manual_seed(seed))
    x = F.interpolate(cells.reshape(-1, c, 4, 4), size=(h, w), mode="nearest")
    return x.reshape(*lead, c, h, w).movedim(-3, -1).contiguous()


# --------------------------------------------------------------------------- the matrix


def test_an_identical_image_gives_similarity_one(openclip):
    image = noise(0, 128, 128, 3)
    layout = Layout(128, 128, (Region(box=(0.0, 0.0, 1.0, 1.0)),))
    result = score_image(image, layout, [SubjectRefs("x", image[None])], image_text=openclip)
    assert result.clip_i.matrix.shape == (1, 1)
    assert float(result.clip_i.matrix[0, 0]) == pytest.approx(1.0, abs=1e-6)


def test_matrix_matches_an_independent_open_clip_computation(openclip, raw_openclip):
    """Rows are regions, columns subjects; each cell the mean cosine over the subject's views."""
    model, tokenizer = raw_openclip
    image = noise(1, 128, 256, 3)
    refs = [SubjectRefs("a", noise(2, 1, 90, 60, 3)), SubjectRefs("b", noise(3, 2, 70, 70, 3))]
    result = score_image(image, two_box_layout(), refs, prompt="a photo of a cat and a dog", image_text=openclip)
    regions = hand_embed(model, [image[:, :128], image[:, 128:]])
    views = [hand_embed(model, [r.images[v] for v in range(r.images.shape[0])]) for r in refs]
    expected = np.array([[float((views[s] @ regions[r]).mean()) for s in range(2)] for r in range(2)])
    np.testing.assert_allclose(result.clip_i.matrix.numpy(), expected, atol=2e-5)
    # CLIP-T: the whole image (padded square) against the prompt, raw cosine
    whole = hand_embed(model, [image])[0]
    with torch.no_grad():
        t = model.encode_text(tokenizer(["a photo of a cat and a dog"])).double().numpy()[0]
    assert result.clip_t == pytest.approx(float(whole @ (t / np.linalg.norm(t))), abs=2e-5)
    assert result.backbones == {"clip_image": openclip.image.name, "clip_text": openclip.text.name}


def test_swapping_two_subjects_regions_swaps_the_matrix_rows(openclip):
    a, b = noise(4, 128, 128, 3), noise(5, 128, 128, 3)
    refs = [SubjectRefs("a", noise(6, 1, 80, 80, 3)), SubjectRefs("b", noise(7, 1, 80, 80, 3))]
    first = score_image(torch.cat([a, b], 1), two_box_layout(), refs, image_text=openclip).clip_i.matrix
    swapped = score_image(torch.cat([b, a], 1), two_box_layout(), refs, image_text=openclip).clip_i.matrix
    torch.testing.assert_close(swapped, first[[1, 0]], atol=1e-7, rtol=0)
    assert not torch.allclose(first, first[[1, 0]], atol=1e-4)  # the rows really differ


def test_leakage_is_the_off_diagonal_and_the_margin_own_minus_best_other():
    m = torch.tensor([[0.9, 0.2, 0.5], [0.4, 0.7, 0.1], [0.3, 0.8, 0.6]], dtype=torch.float64)
    sm = SubjectMatrix(m)
    labels = ("a", "b", "c")
    d = sm.as_dict(labels)
    for i in range(3):
        others = {labels[j]: m[i, j].item() for j in range(3) if j != i}
        assert d["leakage"][i] == pytest.approx(others)
        assert d["own"][i] == pytest.approx(m[i, i].item())
        assert d["margin"][i] == pytest.approx(m[i, i].item() - max(others.values()))
    lk = sm.leakage()
    assert torch.isnan(lk.diagonal()).all() and torch.equal(lk.nan_to_num(0) + torch.diag(m.diagonal()), m)
    assert d["mean_margin"] == pytest.approx(((0.9 - 0.5) + (0.7 - 0.4) + (0.6 - 0.8)) / 3, abs=1e-6)  # JSON: 6 digits
    assert SubjectMatrix(torch.ones(1, 1)).as_dict(("solo",))["margin"] == [None]  # one subject: no other


def test_multiple_views_average_the_cosines(openclip):
    """Not the cosine of the mean embedding: the mean of the per-view cosines (DreamBooth's CLIP-I over references)."""
    image = noise(8, 64, 64, 3)
    views = noise(9, 3, 40, 40, 3)
    layout = Layout(64, 64, (Region(box=(0, 0, 1, 1)),))
    got = float(score_image(image, layout, [SubjectRefs("x", views)], image_text=openclip).clip_i.matrix[0, 0])
    e = openclip.image.encode(torch.stack([prepare(c, SIZE) for c in [image, *views]])).double()
    e = e / e.norm(dim=1, keepdim=True)
    assert got == pytest.approx(float((e[1:] @ e[0]).mean()), abs=1e-9)
    assert got != pytest.approx(float(F.cosine_similarity(e[1:].mean(0), e[0], dim=0)), abs=1e-6)


# --------------------------------------------------------------------------- crops


@pytest.mark.parametrize("box,size,expected", [
    ((0.0, 0.25, 0.5, 0.75), (100, 100), (25, 75, 0, 50)),
    ((0.1, 0.1, 0.35, 0.6), (64, 64), (6, 39, 6, 23)),  # floor of the start, ceil of the end: 6.4 -> 6, 22.4 -> 23
    ((0.15, 0.2, 0.5, 0.61), (64, 64), (12, 40, 9, 32)),  # 9.6 -> 9 (not rounded up), 39.04 -> 40
    ((0.5, 0.5, 0.5001, 0.5001), (10, 10), (5, 6, 5, 6)),  # at least one pixel
])
def test_box_slice_takes_every_pixel_the_box_touches(box, size, expected):
    assert box_slice(box, *size) == expected


def test_a_mask_region_is_cut_to_its_mask_and_blanked_white():
    image = noise(10, 32, 32, 3)
    mask = torch.zeros(32, 32)
    mask[8:16, 4:20] = 1.0
    mask[8:10, 4:6] = 0.0  # a notch: blanked to white inside the crop
    layout = Layout(32, 32, (Region(mask=mask),))
    (crop,) = region_crops(image, layout)
    expected = image[8:16, 4:20].clone()
    expected[0:2, 0:2] = 1.0
    torch.testing.assert_close(crop, expected)


def test_center_crop_mode_cuts_the_middle_square():
    crop = torch.zeros(20, 40, 3)
    crop[:, 10:30] = 1.0  # the centre 20x20 is white, the sides black
    assert float(prepare(crop, 20, "center").min()) == pytest.approx(1.0, abs=1e-6)
    assert float(prepare(crop, 20, "pad").min()) == pytest.approx(0.0, abs=1e-6)  # padded: the black sides stay


# --------------------------------------------------------------------------- a real MS-Bench case


@pytest.mark.parametrize("combination", ["living_object", "living_living_living", "object_object_object"])
def test_pasted_msbench_photos_beat_every_other_subject(msbench, openclip, combination):
    """Even a random tiny encoder: each region's crop is its reference, so own > any other, for every subject."""
    image, layout, refs = pasted_case(msbench, combination)
    result = score_image(image, layout, refs, prompt="a photo", image_text=openclip)
    m = result.clip_i.matrix
    for i in range(len(refs)):
        assert m[i, i] > max(m[i, j] for j in range(len(refs)) if j != i), (combination, i, m)
    assert (result.clip_i.margin() > 0).all()


# --------------------------------------------------------------------------- errors and the backbone names


def test_refusals_say_what_to_fix(openclip, tmp_path):
    image = noise(11, 64, 64, 3)
    layout = Layout(64, 64, (Region(box=(0, 0, 1, 1)),))
    with pytest.raises(ValueError, match="2 subjects but 1 layout regions; give one region per subject"):
        score_image(image, layout, [SubjectRefs("a", image[None]), SubjectRefs("b", image[None])], image_text=openclip)
    with pytest.raises(ValueError, match="no backbone"):
        score_image(image, layout, [SubjectRefs("a", image[None])])
    with pytest.raises(ValueError, match="crop mode 'stretch' is not one of pad, center"):
        score_image(image, layout, [SubjectRefs("a", image[None])], image_text=openclip, crop="stretch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpenClipError, match="has no open_clip_config.json"):
        openclip_model(str(tmp_path / "empty"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(OpenClipError, match="single weights file: give its architecture"):
        openclip_model(str(tmp_path / "weights.safetensors"))
    with pytest.raises(OpenClipError, match="unknown OpenCLIP architecture 'ViT-Q-99'"):
        openclip_model(str(tmp_path / "weights.safetensors"), "ViT-Q-99")


def test_a_tower_without_text_measures_clip_i_only():
    tower = ImageTower("mean colour", 8, lambda b: b.mean((1, 2)))
    image = noise(12, 32, 32, 3)
    layout = Layout(32, 32, (Region(box=(0, 0, 1, 1)),))
    r = score_image(image, layout, [SubjectRefs("a", image[None])], prompt="ignored", image_text=ImageTextModel(tower))
    assert r.clip_t is None and r.dino is None and r.as_dict()["clip_t"] is None
    assert not math.isnan(float(r.clip_i.matrix[0, 0]))
