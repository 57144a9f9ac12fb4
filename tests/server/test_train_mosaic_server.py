"""A mosaic-trained reference LoRA in the real ComfyUI server: a short run on the tiny FLUX fixture (in this test
process, the trainer's own entry point), the file copied into models/troupe as it is, then TroupeReferenceBranch
loads it and a two-subject workflow samples with it, "as trained" positions included."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures.training_flux import flux_components
from fixtures.training_mosaic import mosaic_config, mosaic_dataset
from PIL import Image

from comfyui_troupe.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
NAME = "mosaic_trained_tiny.safetensors"
SIZE = 128
PROMPT_TEXT = "a corgi sitting next to a teapot on a table"


@pytest.fixture(scope="module")
def server(comfy_server, msbench, module_tmp):
    """The server with the two reference photos in input/ and a freshly trained mosaic LoRA in models/troupe."""
    manifest = mosaic_dataset(module_tmp / "mosaic" / "data", msbench, records=4)
    result = train(mosaic_config(module_tmp / "mosaic", manifest, steps=4), flux_components(), show_bar=False)
    shutil.copy(result.adapter_path, comfy_server.models_dir / "troupe" / NAME)
    for name in ("troupe_dog.jpg", "troupe_teapot.jpg"):
        shutil.copy(ROOT / "assets" / name, comfy_server.input_dir / name)
    return comfy_server


def branch_prompt(lora: str) -> dict:
    boxes = json.dumps({"version": 1, "boxes": [{"x0": 0, "y0": 0, "x1": 0.5, "y1": 1},
                                                 {"x0": 0.5, "y0": 0, "x1": 1, "y1": 1}]})
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "troupe_dog.jpg"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "troupe_teapot.jpg"}},
        "3": {"class_type": "TroupeSubject", "inputs": {"image": ["1", 0], "label": "corgi", "weight": 1.0}},
        "4": {"class_type": "TroupeSubject", "inputs": {"image": ["2", 0], "label": "teapot", "weight": 1.0}},
        "5": {"class_type": "TroupeSubjectList", "inputs": {"subject_1": ["3", 0], "subject_2": ["4", 0]}},
        "6": {"class_type": "TroupeLayout", "inputs": {"width": SIZE, "height": SIZE, "boxes": boxes,
                                                       "subjects": ["5", 0]}},
        "7": {"class_type": "TroupeTestTinyFLUX", "inputs": {"schnell": False, "seed": 0}},
        "8": {"class_type": "TroupeTestTinyVAE", "inputs": {"kind": "flux", "seed": 0}},
        "9": {"class_type": "TroupeReferenceBranch", "inputs": {
            "model": ["7", 0], "vae": ["8", 0], "subjects": ["5", 0], "prompt": PROMPT_TEXT, "reference_size": 64,
            "reference_timestep": 0.0, "reference_guidance": 1.0, "reference_attention": "joint",
            "selective_text": False, "region": False, "lora_name": lora, "lora_strength": 2.0,
            "dem_name": "none", "layout": ["6", 0]}},
        "10": {"class_type": "TroupeTestConditioning", "inputs": {"seed": 1, "kind": "flux", "batch": 1, "width": SIZE,
                                                                 "height": SIZE, "tokens": 256, "guidance": 3.5}},
        "11": {"class_type": "TroupeTestConditioning", "inputs": {"seed": 2, "kind": "flux", "batch": 1, "width": SIZE,
                                                                 "height": SIZE, "tokens": 256, "guidance": 3.5}},
        "12": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["9", 0], "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["12", 0], "seed": 0,
            "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["8", 0]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "mosaic_trained"}},
    }


def saved(server, entry) -> np.ndarray:
    (image,) = entry["outputs"]["15"]["images"]
    return np.asarray(Image.open(server.image_path(image)).convert("RGB")).astype(int)


def test_trained_lora_loads_and_samples_in_the_reference_branch(server, artifacts):
    """The node reads the file as a troupe-layout LoRA of rank 16 on MOSAIC's 15 modules of the tiny FLUX (img_in,
    4 per double block, 3 per single block), places the references "as trained" (the same index), and the LoRA
    changes the image (lora_strength 2: the 4-step LoRA is small)."""
    with_lora = server.run(branch_prompt(NAME))
    report = with_lora["outputs"]["9"]["text"][0]
    assert "troupe LoRA, rank 16, 15 modules (30 keys)" in report, report
    assert "positions: same index (AlignGen) (as trained)" in report, report
    image = saved(server, with_lora)
    assert image.shape == (SIZE, SIZE, 3)
    plain = saved(server, server.run(branch_prompt("none")))
    assert np.abs(image - plain).max() > 0
    Image.fromarray(image.astype(np.uint8)).save(artifacts / "mosaic_trained_lora.png")
