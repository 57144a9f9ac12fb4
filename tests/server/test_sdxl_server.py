"""TroupeApplySDXL in the real ComfyUI 0.3.75 server: two MS-Bench subjects in a two-box layout on the tiny SDXL.

The adapter files are synthesised in the published key layouts (scaled down, tests/fixtures/sdxl_adapters.py)
and written into ``models/troupe`` of the running server; the label embeddings come from ComfyUI's own SDXL
CLIP (clip_l + clip_g) at tiny width (the test-only TroupeTestTinySDXLCLIP).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from comfy_server import PromptError
from fixtures.sdxl_adapters import (
    ip_adapter_plus_state_dict,
    ip_adapter_sdxl_state_dict,
    ms_diffusion_state_dict,
    r3_state_dict,
    write_adapter,
)
from PIL import Image

PHRASE = 32  # tiny clip_l width = the synthesised resampler's phrase width
WIDTH, HEIGHT = 160, 96  # a non-square canvas: a 20 x 12 latent
BOXES = {"version": 1, "boxes": [{"x0": 0.05, "y0": 0.1, "x1": 0.55, "y1": 0.9, "label": "dog"},
                                 {"x0": 0.45, "y0": 0.2, "x1": 0.95, "y1": 0.95, "label": "teddy bear"}]}
FILES = {
    "server_ms_diffusion.bin": lambda: (ms_diffusion_state_dict(3, phrase_dim=PHRASE), True),
    "server_r3.safetensors": lambda: (r3_state_dict(4, phrase_dim=PHRASE), False),
    "server_ip_plus.safetensors": lambda: (ip_adapter_plus_state_dict(5), False),
    "server_ip_base.bin": lambda: (ip_adapter_sdxl_state_dict(6), True),
    "server_ms_width32.safetensors": lambda: (ms_diffusion_state_dict(7, phrase_dim=PHRASE, image_width=32), False),
}


@pytest.fixture(scope="module")
def files(comfy_server, msbench) -> dict[str, str]:
    """Adapter files in models/troupe and two MS-Bench photos in the input folder."""
    for name, make in FILES.items():
        sd, nested = make()
        write_adapter(comfy_server.models_dir / "troupe" / name, sd, nested_bin=nested)
    photos = {"dog": "images/living/dog.jpg", "bear": "images/object/teddybear.jpg"}
    out = {}
    for key, rel in photos.items():
        out[key] = f"sdxl_{key}.jpg"
        shutil.copy(msbench / rel, comfy_server.input_dir / out[key])
    return out


def prompt(files: dict, adapter: str | None, *, cfg: float = 4.0, routing: str = "learned", weight: float = 0.8,
           blocks: str = "all", prefix: str = "sdxl") -> dict:
    """Tiny SDXL + CLIP vision + adapter + two subjects + layout -> TroupeApplySDXL -> KSampler -> decode -> save."""
    p = {
        "1": {"class_type": "TroupeTestTinySDXL", "inputs": {"seed": 0}},
        "2": {"class_type": "TroupeTestTinyCLIPVision", "inputs": {"layers": 24, "seed": 0}},
        "3": {"class_type": "LoadImage", "inputs": {"image": files["dog"]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": files["bear"]}},
        "5": {"class_type": "TroupeSubject", "inputs": {"image": ["3", 0], "label": "dog", "weight": 1.0}},
        "6": {"class_type": "TroupeSubject", "inputs": {"image": ["4", 0], "label": "teddy bear", "weight": 1.5}},
        "7": {"class_type": "TroupeSubjectList", "inputs": {"subject_1": ["5", 0], "subject_2": ["6", 0]}},
        "8": {"class_type": "TroupeLayout", "inputs": {"width": WIDTH, "height": HEIGHT, "boxes": json.dumps(BOXES),
                                                        "subjects": ["7", 0]}},
        "9": {"class_type": "TroupeEncodeSubjects", "inputs": {"clip_vision": ["2", 0], "subjects": ["7", 0],
                                                                "layers": "10,17,23"}},
        "11": {"class_type": "TroupeTestTinySDXLCLIP", "inputs": {"width_l": PHRASE, "width_g": 32, "seed": 0}},
        "13": {"class_type": "TroupeTestConditioning", "inputs": {"seed": 1, "kind": "sdxl", "batch": 1,
                                                                  "width": WIDTH, "height": HEIGHT, "tokens": 77,
                                                                  "guidance": 3.5}},
        "14": {"class_type": "TroupeTestConditioning", "inputs": {"seed": 2, "kind": "sdxl", "batch": 1,
                                                                  "width": WIDTH, "height": HEIGHT, "tokens": 77,
                                                                  "guidance": 3.5}},
        "15": {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 2}},
        "16": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0] if adapter else ["1", 0], "positive": ["13", 0], "negative": ["14", 0],
            "latent_image": ["15", 0], "seed": 0, "steps": 4, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "17": {"class_type": "TroupeTestTinyVAE", "inputs": {"kind": "sdxl", "seed": 0}},
        "18": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["17", 0]}},
        "19": {"class_type": "SaveImage", "inputs": {"images": ["18", 0], "filename_prefix": prefix}},
    }
    if adapter:
        p["10"] = {"class_type": "TroupeLoadAdapter", "inputs": {"adapter_name": adapter}}
        p["12"] = {"class_type": "TroupeApplySDXL", "inputs": {
            "model": ["1", 0], "adapter": ["10", 0], "features": ["9", 0], "layout": ["8", 0], "weight": weight,
            "start_percent": 0.0, "end_percent": 1.0, "blocks": blocks, "routing": routing, "schedule": "",
            "refine": True, "clip": ["11", 0], "subjects": ["7", 0]}}
    return p


def pixels(comfy_server, entry: dict) -> np.ndarray:
    images = entry["outputs"]["19"]["images"]
    assert len(images) == 2  # batch of 2
    return np.stack([np.asarray(Image.open(comfy_server.image_path(i)), dtype=np.float32) for i in images])


def test_node_schema(comfy_server):
    info = comfy_server.object_info()["TroupeApplySDXL"]
    assert info["output"] == ["MODEL"] and info["category"] == "Troupe/apply"
    req, opt = info["input"]["required"], info["input"]["optional"]
    assert req["blocks"][1]["default"] == "all" and "down+mid" in req["blocks"][1]["options"]  # as trained
    assert req["routing"][1]["options"] == ["learned", "static", "manual"]
    assert opt["clip"][0] == "CLIP" and opt["subjects"][0] == "TROUPE_SUBJECTS"


@pytest.mark.parametrize("adapter", ["server_ms_diffusion.bin", "server_r3.safetensors"])
def test_two_subject_workflow_runs_end_to_end(comfy_server, files, adapter):
    """MS-Diffusion's published layout (nested .bin) and R^3 run with cfg > 1, batch 2, non-square canvas; the
    image differs from the un-patched model's, and the un-patched model's image is unchanged afterwards."""
    base_before = pixels(comfy_server, comfy_server.run(prompt(files, None, prefix="sdxl_base")))
    entry = comfy_server.run(prompt(files, adapter, prefix="sdxl_patched"))
    patched = pixels(comfy_server, entry)
    assert patched.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(patched - base_before).max() > 0
    base_after = pixels(comfy_server, comfy_server.run(prompt(files, None, cfg=4.0001, prefix="sdxl_base2")))
    # cfg differs in the 4th decimal only to defeat the node cache (the base model must run again)
    assert np.abs(base_after - base_before).max() <= 2


def test_ip_adapter_files_run_with_separate_attention(comfy_server, files):
    for name in ("server_ip_plus.safetensors", "server_ip_base.bin"):
        entry = comfy_server.run(prompt(files, name, blocks="down+mid", routing="static", prefix="sdxl_ip"))
        assert pixels(comfy_server, entry).shape == (2, HEIGHT, WIDTH, 3)


def test_wrong_encoder_width_is_a_clear_error(comfy_server, files):
    """Features from an encoder of another width than the file's image projection: the error names both widths."""
    p = prompt(files, "server_ms_width32.safetensors")
    with pytest.raises(PromptError) as e:
        comfy_server.run(p)
    assert "TroupeApplySDXL: input 'features'" in str(e.value) and "width 32 but got 64" in str(e.value)


def test_default_encoder_layers_serve_penultimate_files(comfy_server, files):
    """TroupeEncodeSubjects' 'auto' layers (10, 17, 24 of 24) also keep the penultimate layer the file reads."""
    p = prompt(files, "server_ms_diffusion.bin", prefix="sdxl_auto_layers")
    p["9"]["inputs"]["layers"] = "auto"
    assert pixels(comfy_server, comfy_server.run(p)).shape == (2, HEIGHT, WIDTH, 3)


def test_subject_count_must_match_the_layout(comfy_server, files):
    p = prompt(files, "server_ms_diffusion.bin")
    one_box = json.dumps({"version": 1, "boxes": BOXES["boxes"][:1]})
    p["8"]["inputs"] = {"width": WIDTH, "height": HEIGHT, "boxes": one_box}
    with pytest.raises(PromptError) as e:
        comfy_server.run(p)
    assert "TroupeApplySDXL: input 'layout': 1 regions for 2 encoded subjects" in str(e.value)


def test_shipped_workflow_runs_on_the_tiny_models(comfy_server, files):
    """example_workflows/sdxl_multi_subject.json (UI format) with its loaders swapped for the tiny models, as `make demo`."""
    import importlib.util

    from workflow_api import ui_to_api

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("demo_sdxl", root / "scripts" / "demo_sdxl.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for image in ("troupe_dog.jpg", "troupe_teapot.jpg"):
        shutil.copy(root / "assets" / image, comfy_server.input_dir / image)
    name = demo.write_demo_adapter(comfy_server.models_dir)
    info = comfy_server.object_info()
    workflow = json.loads((root / "example_workflows" / "sdxl_multi_subject.json").read_text())
    api = ui_to_api(workflow, info)
    assert {n["class_type"] for n in api.values()} >= {"CheckpointLoaderSimple", "CLIPVisionLoader",
                                                       "TroupeLoadAdapter", "TroupeApplySDXL", "KSampler"}
    notes = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note")
    for folder in ("checkpoints/", "clip_vision/", "troupe/"):
        assert folder in notes
    entry = comfy_server.run(demo.on_tiny_models(api, name))
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1 and Image.open(comfy_server.image_path(images[0])).size == (demo.SIZE, demo.SIZE)


def test_three_chained_apply_nodes_act_and_weight_zero_leaves_the_chain(comfy_server, files):
    """MS-Diffusion -> IP-Adapter Plus -> R^3, three TroupeApplySDXL in a chain (a run state each): every node
    acts (the image differs from the two-node chain's), and the last one at weight 0 gives that image exactly."""
    def chained(weight: float, prefix: str) -> dict:
        p = prompt(files, "server_ms_diffusion.bin", prefix=prefix)
        p["20"] = {"class_type": "TroupeLoadAdapter", "inputs": {"adapter_name": "server_ip_plus.safetensors"}}
        p["21"] = dict(p["12"], inputs=dict(p["12"]["inputs"], model=["12", 0], adapter=["20", 0]))
        p["22"] = {"class_type": "TroupeLoadAdapter", "inputs": {"adapter_name": "server_r3.safetensors"}}
        p["23"] = dict(p["12"], inputs=dict(p["12"]["inputs"], model=["21", 0], adapter=["22", 0], weight=weight))
        p["24"] = dict(p["16"], inputs=dict(p["16"]["inputs"], model=["21", 0]))  # the two-node chain
        p["25"] = {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["17", 0]}}
        p["26"] = {"class_type": "SaveImage", "inputs": {"images": ["25", 0], "filename_prefix": prefix + "_two"}}
        p["16"]["inputs"]["model"] = ["23", 0]
        return p

    def images(entry: dict, node: str) -> np.ndarray:
        return np.stack([np.asarray(Image.open(comfy_server.image_path(i)), dtype=np.float32)
                         for i in entry["outputs"][node]["images"]])

    entry = comfy_server.run(chained(0.8, "sdxl_chain"))
    assert np.abs(images(entry, "19") - images(entry, "26")).max() > 0
    entry = comfy_server.run(chained(0.0, "sdxl_chain_zero"))
    assert np.array_equal(images(entry, "19"), images(entry, "26"))
