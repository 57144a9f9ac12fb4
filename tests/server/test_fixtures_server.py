"""The TEST-ONLY TroupeTest* nodes (tests/custom_nodes/troupe_test_nodes) in the real ComfyUI 0.3.75 server.

They stand in for checkpoints that do not exist here, so later workflows (SDXL and FLUX adapters, CLIP
vision and DINO encoders) can run end to end through /prompt in seconds.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image

TEST_NODES = {
    "TroupeTestTinySDXL", "TroupeTestTinyFLUX", "TroupeTestTinyCLIPVision", "TroupeTestTinyDINOv2",
    "TroupeTestTinyVAE", "TroupeTestConditioning", "TroupeTestInspect",
}
SIZE = 128  # pixels: a 16 x 16 latent


def conditioning(seed: int, kind: str, tokens: int = 77, guidance: float = 3.5) -> dict:
    return {"class_type": "TroupeTestConditioning",
            "inputs": {"seed": seed, "kind": kind, "batch": 1, "width": SIZE, "height": SIZE, "tokens": tokens,
                       "guidance": guidance}}


def generate_prompt(kind: str, model: dict, cfg: float, prefix: str, tokens: int = 77, guidance: float = 3.5,
                    scheduler: str = "normal") -> dict:
    """model -> KSampler (4 steps, random pos/neg text) -> tiny VAE decode -> SaveImage."""
    latent = "EmptyLatentImage" if kind == "sdxl" else "EmptySD3LatentImage"
    return {
        "1": model,
        "2": conditioning(1, kind, tokens, guidance),
        "3": conditioning(2, kind, tokens, guidance),
        "4": {"class_type": latent, "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 0,
            "steps": 4, "cfg": cfg, "sampler_name": "euler", "scheduler": scheduler, "denoise": 1.0}},
        "6": {"class_type": "TroupeTestTinyVAE", "inputs": {"kind": kind, "seed": 0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def saved_image(server, entry: dict, node_id: str = "8") -> Image.Image:
    images = entry["outputs"][node_id]["images"]
    assert len(images) == 1
    return Image.open(server.image_path(images[0]))


def inspected(entry: dict, node_id: str) -> dict:
    """The JSON that TroupeTestInspect wrote into the history's ui output."""
    return json.loads(entry["outputs"][node_id]["text"][0])


def test_test_nodes_are_registered_in_their_own_category(comfy_server):
    info = comfy_server.object_info()
    assert TEST_NODES <= set(info)
    for name in TEST_NODES:
        node = info[name]
        assert node["category"] == "Troupe/testing", name
        assert node["description"].startswith("TEST ONLY"), name
        assert "troupe_test_nodes" in node["python_module"], node["python_module"]
        for spec in node["input"].get("required", {}).values():
            assert spec[1].get("tooltip"), name
    assert info["TroupeTestInspect"]["output_node"]


def test_test_pack_loads_without_errors(comfy_server):
    log = comfy_server.log()
    assert re.search(r"\d seconds: \S*tests/custom_nodes/troupe_test_nodes\n", log), log[-3000:]
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "troupe_test_nodes" in line]
    for block in re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+.*", log):
        assert "troupe_test_nodes" not in block and "tiny_models" not in block, block


def test_tiny_sdxl_workflow_writes_an_image(comfy_server):
    model = {"class_type": "TroupeTestTinySDXL", "inputs": {"seed": 0}}
    entry = comfy_server.run(generate_prompt("sdxl", model, cfg=5.0, prefix="fixtures_sdxl"))
    image = saved_image(comfy_server, entry)
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"


@pytest.mark.parametrize("schnell,cfg,guidance", [(False, 1.0, 3.5), (False, 2.5, 1.0), (True, 3.0, 0.0)],
                         ids=["dev-guidance", "dev-real-cfg", "schnell-real-cfg"])
def test_tiny_flux_workflow_writes_an_image(comfy_server, schnell, cfg, guidance):
    model = {"class_type": "TroupeTestTinyFLUX", "inputs": {"schnell": schnell, "seed": 0}}
    prompt = generate_prompt("flux", model, cfg=cfg, prefix=f"fixtures_flux_{int(schnell)}", tokens=32,
                             guidance=guidance, scheduler="simple")
    image = saved_image(comfy_server, comfy_server.run(prompt))
    assert image.size == (SIZE, SIZE)


def test_clip_vision_encode_on_a_real_photo(comfy_server, msbench):
    """Core CLIPVisionEncode runs on the tiny CLIP vision and the tiny DINOv2 (both real CLIP_VISION objects)."""
    shutil.copy(msbench / "images" / "living" / "dog.jpg", comfy_server.input_dir / "fixtures_dog.jpg")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "fixtures_dog.jpg"}},
        "2": {"class_type": "TroupeTestTinyCLIPVision", "inputs": {"layers": 24, "seed": 0}},
        "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["2", 0], "image": ["1", 0],
                                                           "crop": "center"}},
        "4": {"class_type": "TroupeTestInspect", "inputs": {"value": ["3", 0]}},
        "5": {"class_type": "TroupeTestTinyDINOv2", "inputs": {"layers": 6, "seed": 0}},
        "6": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["5", 0], "image": ["1", 0],
                                                           "crop": "none"}},
        "7": {"class_type": "TroupeTestInspect", "inputs": {"value": ["6", 0]}},
    }
    entry = comfy_server.run(prompt)
    clip = inspected(entry, "4")
    assert clip["last_hidden_state"]["shape"] == [1, 257, 64]
    assert clip["penultimate_hidden_states"]["shape"] == [1, 257, 64]
    assert clip["image_embeds"]["shape"] == [1, 48] and clip["image_embeds"]["finite"]
    dino = inspected(entry, "7")
    assert dino["last_hidden_state"]["shape"] == [1, 1370, 64] and dino["image_embeds"]["shape"] == [1, 64]


def test_conditioning_node_has_sdxl_and_flux_dims(comfy_server):
    prompt = {
        "1": conditioning(3, "sdxl"),
        "2": {"class_type": "TroupeTestInspect", "inputs": {"value": ["1", 0]}},
        "3": conditioning(3, "flux", tokens=256, guidance=4.0),
        "4": {"class_type": "TroupeTestInspect", "inputs": {"value": ["3", 0]}},
    }
    entry = comfy_server.run(prompt)
    context, extra = inspected(entry, "2")["items"][0]["items"]
    assert context["shape"] == [1, 77, 2048] and extra["pooled_output"]["shape"] == [1, 1280]
    assert (extra["width"], extra["target_height"]) == (SIZE, SIZE)
    context, extra = inspected(entry, "4")["items"][0]["items"]
    assert context["shape"] == [1, 256, 4096] and extra["pooled_output"]["shape"] == [1, 768]
    assert extra["guidance"] == 4.0
