"""Reference crops as each adapter family's official code makes them (README, "Golden parity").

IP-Adapter (tencent-ailab, ``CLIPImageProcessor()``): short side resized, centre crop. The golden images have a
short side of 224, so the official result has no resampling and the pack must match it to float32 rounding.
MS-Diffusion: every reference resized to a square first (``resize_ref=True``; PIL bilinear to 512, then the
processor's bicubic to 224); the pack stretches in one antialiased bicubic step, so the two agree to resampling
differences (a few 8-bit levels on smooth content), far below the gap to any other geometry.
"""
from __future__ import annotations

import pytest
import torch
from fixtures.goldens import assert_parity, golden
from fixtures.tiny_models import ensure_comfy

from comfyui_troupe.models.encoding.clip_features import (
    AS_TRAINED,
    CENTRE_CROP,
    PAD,
    STRETCH,
    crops_to_encode,
    encoder_kind,
    subject_batch,
)

G = golden("clip_preprocessing")
SHAPES = ("landscape", "portrait")


def pixels(name: str, crop: str) -> torch.Tensor:
    """What TroupeEncodeSubjects feeds a 224-px CLIP: the pack's crop, then ComfyUI's clip_preprocess."""
    ensure_comfy()
    import comfy.clip_vision

    image = G[f"{name}_image"].float() / 255.0
    return comfy.clip_vision.clip_preprocess(subject_batch([image], [None], 224, crop), size=224, crop=False)


@pytest.mark.parametrize("name", SHAPES)
def test_centre_crop_is_ip_adapters_clip_image_processor(name):
    assert_parity(pixels(name, CENTRE_CROP), G[f"{name}_ip_adapter"])


@pytest.mark.parametrize("name", SHAPES)
def test_stretch_is_ms_diffusions_square_resize(name):
    diff = (pixels(name, STRETCH) - G[f"{name}_ms_diffusion"]).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.1  # resampling filters differ, not the geometry


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("crop", [PAD, STRETCH])
def test_other_geometries_are_far_from_ip_adapters(name, crop):
    """Why the default matters: padding or stretching moves every pixel of the reference (mean error > 0.3)."""
    assert float((pixels(name, crop) - G[f"{name}_ip_adapter"]).abs().mean()) > 0.3


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("crop", [PAD, CENTRE_CROP])
def test_other_geometries_are_far_from_ms_diffusions(name, crop):
    assert float((pixels(name, crop) - G[f"{name}_ms_diffusion"]).abs().mean()) > 0.3


@pytest.mark.parametrize("kind, crops", [
    ("vit-H", (CENTRE_CROP,)), ("vit-L", (CENTRE_CROP,)), ("siglip", (STRETCH,)),
    ("vit-bigG", (STRETCH, CENTRE_CROP)), ("vit-L-336", (PAD,)), ("other", (PAD,)),
])
def test_as_trained_encodes_each_family_geometry_of_the_encoder(kind, crops):
    assert crops_to_encode(AS_TRAINED, kind) == crops
    assert crops_to_encode(PAD, kind) == (PAD,)


def test_encoder_kinds():
    assert encoder_kind(48, 1664, 224, False) == "vit-bigG"
    assert encoder_kind(32, 1280, 224, False) == "vit-H"
    assert encoder_kind(24, 1024, 224, False) == "vit-L"
    assert encoder_kind(24, 1024, 336, False) == "vit-L-336"
    assert encoder_kind(27, 1152, 384, True) == "siglip"
