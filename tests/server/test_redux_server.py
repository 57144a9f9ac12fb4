"""FLUX Redux through ComfyUI's own StyleModelApply, both strength modes, into TroupeReferenceBranch's DEM in the
real server (tiny FLUX; a Redux-shaped style model and 729 SigLIP-384 tokens per subject from a test node).

In ``attn_bias`` mode StyleModelApply adds an attention mask sized for the Redux tokens; the branch's DEM consumes
those tokens and removes them, so it re-indexes the mask with them: the run completes, and since the bias only
ever touched the removed Redux columns, attn_bias gives the image that multiply at strength 1 gives. (How the
strength changes what the DEM reads shows in the latents, below 8-bit pixels on the tiny model:
tests/unit/test_redux_dem.py.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures.tiny_models import write_checkpoint
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
PROMPT = "a corgi sitting next to a teapot on a table"


@pytest.fixture(scope="module")
def server(comfy_server):
    for name in ("troupe_dog.jpg", "troupe_teapot.jpg"):
        shutil.copy(ROOT / "assets" / name, comfy_server.input_dir / name)
    from comfyui_troupe.models.reference.dem import DeviationExtractionModule

    dem = DeviationExtractionModule(dim=4096, redux_dim=4096, heads=2, mlp_ratio=64 / 4096, inner=64)
    write_checkpoint(comfy_server.models_dir / "troupe" / "tiny_dem_redux.safetensors", dem.state_dict(),
                     metadata={"format": "troupe.dem", "heads": "2"})
    return comfy_server


def prompt(strength: float, mode: str) -> dict:
    boxes = json.dumps({"version": 1, "boxes": [{"x0": 0, "y0": 0, "x1": 0.5, "y1": 1},
                                                 {"x0": 0.5, "y0": 0, "x1": 1, "y1": 1}]})
    p = {
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
            "model": ["7", 0], "vae": ["8", 0], "subjects": ["5", 0], "prompt": PROMPT, "reference_size": 64,
            "reference_timestep": 0.0, "reference_guidance": 1.0, "reference_attention": "joint",
            "selective_text": True, "region": False, "lora_name": "none", "lora_strength": 1.0,
            "dem_name": "tiny_dem_redux.safetensors", "layout": ["6", 0]}},
        "10": {"class_type": "TroupeTestConditioning", "inputs": {"seed": 1, "kind": "flux", "batch": 1, "width": SIZE,
                                                                 "height": SIZE, "tokens": 256, "guidance": 3.5}},
        "11": {"class_type": "TroupeTestConditioning", "inputs": {"seed": 2, "kind": "flux", "batch": 1, "width": SIZE,
                                                                 "height": SIZE, "tokens": 256, "guidance": 3.5}},
        "20": {"class_type": "TroupeTestTinyRedux", "inputs": {"seed": 0}},
        "21": {"class_type": "StyleModelApply", "inputs": {"conditioning": ["10", 0], "style_model": ["20", 0],
                                                           "clip_vision_output": ["20", 1], "strength": strength,
                                                           "strength_type": mode}},
        "22": {"class_type": "TroupeTestTinyRedux", "inputs": {"seed": 1}},
        "23": {"class_type": "StyleModelApply", "inputs": {"conditioning": ["21", 0], "style_model": ["22", 0],
                                                           "clip_vision_output": ["22", 1], "strength": strength,
                                                           "strength_type": mode}},
        "12": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["9", 0], "positive": ["23", 0], "negative": ["11", 0], "latent_image": ["12", 0], "seed": 0,
            "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["8", 0]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": f"redux_{mode}"}},
    }
    return p


def image(server, entry) -> np.ndarray:
    (img,) = entry["outputs"]["15"]["images"]
    return np.asarray(Image.open(server.image_path(img)).convert("RGB")).astype(int)


def test_attn_bias_mode_runs_and_its_mask_leaves_with_the_redux_tokens(server):
    biased = image(server, server.run(prompt(0.5, "attn_bias")))
    plain = image(server, server.run(prompt(1.0, "multiply")))
    assert np.array_equal(biased, plain)


def test_multiply_mode_runs_end_to_end(server):
    """multiply at any strength scales the tokens the DEM reads (the in-process test checks the latents differ:
    tests/unit/test_redux_dem.py); here both strengths run through the server and decode."""
    for strength in (0.5, 1.0):
        assert image(server, server.run(prompt(strength, "multiply"))).shape == (SIZE, SIZE, 3)
