"""TroupeAttentionMaps in the real ComfyUI server: MS-Diffusion on the tiny SDXL, recorded, decoded and rendered.

Checks what only the server shows: the nodes' schema (tooltips), the recorded graph's image equals the unrecorded
one's, the render runs after the sampler and gives subjects + 1 frames per image, and a re-queued graph with
another seed renders that run's maps (the node cache and the per-run recorder do not mix runs).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fixtures.sdxl_adapters import ms_diffusion_state_dict, write_adapter
from PIL import Image

PHRASE = 32
WIDTH, HEIGHT = 160, 96
BOXES = {"version": 1, "boxes": [{"x0": 0.05, "y0": 0.1, "x1": 0.5, "y1": 0.9, "label": "dog"},
                                 {"x0": 0.6, "y0": 0.2, "x1": 0.95, "y1": 0.95, "label": "teddy bear"}]}


@pytest.fixture(scope="module")
def files(comfy_server, msbench) -> dict[str, str]:
    write_adapter(comfy_server.models_dir / "troupe" / "maps_ms_diffusion.bin", ms_diffusion_state_dict(
        3, phrase_dim=PHRASE), nested_bin=True)
    out = {}
    for key, rel in {"dog": "images/living/dog.jpg", "bear": "images/object/teddybear.jpg"}.items():
        out[key] = f"maps_{key}.jpg"
        shutil.copy(msbench / rel, comfy_server.input_dir / out[key])
    return out


def prompt(files: dict, record: bool, seed: int, prefix: str) -> dict:
    """Tiny SDXL + two subjects + layout -> TroupeApplySDXL (-> TroupeAttentionMaps) -> KSampler -> decode -> save."""
    p = {
        "1": {"class_type": "TroupeTestTinySDXL", "inputs": {"seed": 0}},
        "2": {"class_type": "TroupeTestTinyCLIPVision", "inputs": {"layers": 24, "seed": 0}},
        "3": {"class_type": "LoadImage", "inputs": {"image": files["dog"]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": files["bear"]}},
        "5": {"class_type": "TroupeSubject", "inputs": {"image": ["3", 0], "label": "dog", "weight": 1.0}},
        "6": {"class_type": "TroupeSubject", "inputs": {"image": ["4", 0], "label": "teddy bear", "weight": 1.0}},
        "7": {"class_type": "TroupeSubjectList", "inputs": {"subject_1": ["5", 0], "subject_2": ["6", 0]}},
        "8": {"class_type": "TroupeLayout", "inputs": {"width": WIDTH, "height": HEIGHT, "boxes": json.dumps(BOXES),
                                                        "subjects": ["7", 0]}},
        "9": {"class_type": "TroupeEncodeSubjects", "inputs": {"clip_vision": ["2", 0], "subjects": ["7", 0],
                                                                "layers": "10,17,23"}},
        "10": {"class_type": "TroupeLoadAdapter", "inputs": {"adapter_name": "maps_ms_diffusion.bin"}},
        "11": {"class_type": "TroupeTestTinySDXLCLIP", "inputs": {"width_l": PHRASE, "width_g": 32, "seed": 0}},
        "12": {"class_type": "TroupeApplySDXL", "inputs": {
            "model": ["1", 0], "adapter": ["10", 0], "features": ["9", 0], "layout": ["8", 0], "weight": 0.8,
            "start_percent": 0.0, "end_percent": 1.0, "blocks": "all", "routing": "learned", "schedule": "",
            "refine": True, "clip": ["11", 0], "subjects": ["7", 0]}},
        "13": {"class_type": "TroupeTestConditioning", "inputs": {"seed": 1, "kind": "sdxl", "batch": 1,
                                                                  "width": WIDTH, "height": HEIGHT, "tokens": 77,
                                                                  "guidance": 3.5}},
        "14": {"class_type": "TroupeTestConditioning", "inputs": {"seed": 2, "kind": "sdxl", "batch": 1,
                                                                  "width": WIDTH, "height": HEIGHT, "tokens": 77,
                                                                  "guidance": 3.5}},
        "15": {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 2}},
        "16": {"class_type": "KSampler", "inputs": {
            "model": ["20", 0] if record else ["12", 0], "positive": ["13", 0], "negative": ["14", 0],
            "latent_image": ["15", 0], "seed": seed, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "17": {"class_type": "TroupeTestTinyVAE", "inputs": {"kind": "sdxl", "seed": 0}},
        "18": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["17", 0]}},
        "19": {"class_type": "SaveImage", "inputs": {"images": ["18", 0], "filename_prefix": prefix}},
    }
    if record:
        p["20"] = {"class_type": "TroupeAttentionMaps", "inputs": {"model": ["12", 0], "blocks": "all",
                                                                    "start_percent": 0.0, "end_percent": 1.0}}
        p["21"] = {"class_type": "TroupeAttentionMapsRender", "inputs": {"image": ["18", 0], "recording": ["20", 1],
                                                                          "subjects": ["7", 0]}}
        p["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": prefix + "_maps"}}
    return p


def images(comfy_server, entry: dict, node: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(comfy_server.image_path(i)), dtype=np.float32)
                     for i in entry["outputs"][node]["images"]])


def test_schema_has_a_tooltip_on_every_input(comfy_server):
    info = comfy_server.object_info()
    for node in ("TroupeAttentionMaps", "TroupeAttentionMapsRender"):
        inputs = info[node]["input"]["required"]
        assert inputs and all(spec[1].get("tooltip") for spec in inputs.values()), node
    assert info["TroupeAttentionMaps"]["output"] == ["MODEL", "TROUPE_ATTENTION_RECORDING"]


def test_recorded_graph_renders_maps_and_keeps_the_image(comfy_server, files):
    """The recorded image equals the unrecorded one; 2 images x (2 subjects + argmax) frames; another seed (the
    recording node cached) renders the new run's maps."""
    plain = images(comfy_server, comfy_server.run(prompt(files, False, 0, "maps_plain")), "19")
    entry = comfy_server.run(prompt(files, True, 0, "maps_rec"))
    assert np.array_equal(images(comfy_server, entry, "19"), plain)
    maps = images(comfy_server, entry, "22")
    assert maps.shape == (6, HEIGHT, WIDTH, 3)
    assert np.abs(maps[0] - maps[1]).max() > 0  # two subjects, two different maps
    other = comfy_server.run(prompt(files, True, 1, "maps_rec_seed1"))
    new_maps = images(comfy_server, other, "22")
    assert new_maps.shape == maps.shape and np.abs(new_maps - maps).max() > 0
