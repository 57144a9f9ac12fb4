"""Defaults that follow the file (issue 10, "Paper details"): what the nodes do when the artist changes nothing.

Each case names the paper or official code it follows; the golden tests check the maths, these check that the
defaults pick it.
"""
from __future__ import annotations

import re

import pytest
import torch
from fixtures.tiny_models import ensure_comfy


@pytest.fixture(autouse=True)
def comfy():
    ensure_comfy()  # the node modules import ComfyUI


def schema_default(node_cls, name: str):
    for i in node_cls.define_schema().inputs:
        if i.id == name:
            return i
    raise KeyError(name)


# --------------------------------------------------------------------------- 1. layers with subject tokens


def test_all_seventy_layers_get_subject_tokens_by_default():
    """MS-Diffusion and IP-Adapter inject into every cross-attention layer; 000's down+mid is its alignment loss."""
    from comfyui_troupe.models.sdxl.adapter import sdxl_layer_keys
    from comfyui_troupe.models.sdxl.patch import RegionalParams, block_selected
    from comfyui_troupe.nodes.sdxl import TroupeApplySDXL

    keys = sdxl_layer_keys()
    assert RegionalParams().blocks == "all" and schema_default(TroupeApplySDXL, "blocks").default == "all"
    assert sum(block_selected(k, "all") for k in keys) == 70
    assert sum(block_selected(k, "down+mid") for k in keys) == 34  # still available, on request


# --------------------------------------------------------------------------- 2. the schedule example


def test_schedule_example_puts_structure_first():
    """000 Sec. 3.3: base tokens early (t = 1 is the first step), the finest level T3 late."""
    from comfyui_troupe.models.sdxl.router import parse_schedule
    from comfyui_troupe.nodes.sdxl import TroupeApplySDXL

    tip = schema_default(TroupeApplySDXL, "schedule").tooltip
    example = re.search(r"'([^']*;[^']*)'", tip).group(1)
    schedule = parse_schedule(example, 4)
    assert int(torch.argmax(schedule(1.0))) == 0 and int(torch.argmax(schedule(0.0))) == 3


# --------------------------------------------------------------------------- 3. crops (see test_golden_crops)


def test_adapters_name_their_training_crop():
    from comfyui_troupe.models.flux.adapter import TRAINED_CROP as FLUX_CROP
    from comfyui_troupe.models.sdxl.adapter import TRAINED_CROP as SDXL_CROP
    from comfyui_troupe.nodes.encoding import TroupeEncodeSubjects

    assert SDXL_CROP == {"troupe-r3": "stretch", "ms-diffusion": "stretch", "ip-adapter-plus-sdxl": "centre crop",
                         "ip-adapter-sdxl": "centre crop"}
    assert FLUX_CROP == {"troupe-flux": "pad", "instantx-flux": "stretch", "xlabs-flux": "centre crop"}
    assert schema_default(TroupeEncodeSubjects, "crop").default == "as trained"


def test_each_adapter_reads_the_crop_it_was_trained_with():
    from comfyui_troupe.models.encoding.reference_features import ClipFeatures, CropView

    stretch, centre = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    f = ClipFeatures(hidden=torch.zeros(2, 3, 3, 4), layers=(1, 2, 3), encoder="bigG", labels=("a", "b"), depth=3,
                     penultimate=stretch, crop="stretch", crop_choice="as trained",
                     crop_views={"stretch": CropView(stretch), "centre crop": CropView(centre)})
    assert f.for_crop("stretch").penultimate is stretch and f.for_crop("centre crop").penultimate is centre
    assert f.for_crop("pad") is f  # not encoded: the node reports it
    assert f.crop_note("stretch") == "crop: stretch (as trained)"
    assert "trained with 'pad'" in f.crop_note("pad")


# --------------------------------------------------------------------------- 5. reference positions


def test_alignGen_files_give_every_reference_the_same_index():
    from comfyui_troupe.models.reference.branch import OFFSETS, SAME_INDEX, reference_positions, trained_positions

    offsets = reference_positions([(2, 3), (2, 3)])
    same = reference_positions([(2, 3), (2, 3)], same_index=True)
    assert torch.equal(same[0], same[1]) and not torch.equal(offsets[0], offsets[1])
    assert float(same[0][:, 2].max()) < 0  # still left of the image (image columns >= 0)
    assert trained_positions("as trained", "mosaic") == OFFSETS
    assert trained_positions("as trained", None) == OFFSETS
    assert trained_positions("as trained", "troupe") == SAME_INDEX
    assert trained_positions(OFFSETS, "troupe") == OFFSETS


# --------------------------------------------------------------------------- 6. per-subject weights


@pytest.mark.parametrize("fmt, given, rule, scales", [
    ("ms-diffusion", (1.0, 0.5), "as trained", [1.0, 0.5]),  # MS-Diffusion: the subject scales replace weight
    ("ms-diffusion", (), "as trained", [0.6, 0.6]),  # no subject weights: the global scale, as MS-Diffusion
    ("ms-diffusion", (1.0, 0.5), "times weight", [0.6, 0.3]),
    ("ip-adapter-plus-sdxl", (1.0, 0.5), "as trained", [0.6, 0.3]),
    ("troupe-r3", (1.0, 0.5), "as trained", [0.6, 0.3]),
])
def test_subject_weights_follow_the_file(fmt, given, rule, scales):
    from types import SimpleNamespace

    from comfyui_troupe.models.sdxl.patch import RegionalParams, subject_scales

    p = RegionalParams(weight=0.6, subject_weights=given, subject_scale=rule)
    torch.testing.assert_close(subject_scales(SimpleNamespace(format=fmt), p, 2), torch.tensor(scales))


# --------------------------------------------------------------------------- InstantX single blocks


def test_instantx_files_inject_as_instantx_by_default():
    from comfyui_troupe.models.flux.injection import IMAGE_ONLY, SINGLE_STREAM, resolve_dds
    from comfyui_troupe.nodes.flux import ApplySettings, TroupeApplyFLUX

    assert ApplySettings().branches == "as trained" == schema_default(TroupeApplyFLUX, "branches").default
    assert resolve_dds("as trained", "instantx-flux") == SINGLE_STREAM
    assert resolve_dds("as trained", "troupe-flux") == IMAGE_ONLY  # DynaIP's DDS stays the default for ours
    assert resolve_dds("as trained", "xlabs-flux") == IMAGE_ONLY
    assert resolve_dds("both branches", "instantx-flux") == "both branches"
