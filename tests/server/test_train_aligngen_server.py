"""aligngen-trained files in the real ComfyUI server: a short run on the tiny FLUX fixture (in this test process, the
trainer's own entry point), the three files installed as a user installs them (S* in models/embeddings, the DEM and
the reference LoRA in models/troupe), then a workflow writes ``embedding:aligngen_s_star`` before each label in
CLIPTextEncode and in TroupeReferenceBranch, applies FLUX Redux once per subject with StyleModelApply, and samples."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from comfy_server import PromptError
from fixtures.training_aligngen import aligngen_components, aligngen_config, aligngen_dataset
from fixtures.troupe_graphs import copy_photos
from PIL import Image

from comfyui_troupe.training.trainer import train

LORA, DEM = "aligngen_tiny.safetensors", "aligngen_tiny.dem.safetensors"
SIZE = 128
PROMPT = "a embedding:aligngen_s_star corgi sitting next to a embedding:aligngen_s_star teapot on a table"


@pytest.fixture(scope="module")
def server(comfy_server, msbench, module_tmp):
    manifest = aligngen_dataset(module_tmp / "aligngen" / "data", msbench, records=4)
    result = train(aligngen_config(module_tmp / "aligngen", manifest, steps=4), aligngen_components(), show_bar=False)
    lora = Path(result.adapter_path)
    shutil.copy(lora, comfy_server.models_dir / "troupe" / LORA)
    shutil.copy(lora.with_name(lora.stem + ".dem.safetensors"), comfy_server.models_dir / "troupe" / DEM)
    shutil.copy(lora.with_name("aligngen_s_star.safetensors"), comfy_server.models_dir / "embeddings")
    copy_photos(comfy_server)
    return comfy_server


def workflow(dem: str, lora: str, prompt: str = PROMPT) -> dict:
    redux = {}
    for k, (src, style) in enumerate((("t", "r1"), ("r1", "r2"))):  # one StyleModelApply per subject, in order
        redux[style] = {"class_type": "StyleModelApply", "inputs": {
            "conditioning": [src, 0], "style_model": ["tiny", 2], "clip_vision_output": ["tiny", 3],
            "strength": 1.0, "strength_type": "multiply"}}
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "troupe_dog.jpg"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "troupe_teapot.jpg"}},
        "3": {"class_type": "TroupeSubject", "inputs": {"image": ["1", 0], "label": "corgi", "weight": 1.0}},
        "4": {"class_type": "TroupeSubject", "inputs": {"image": ["2", 0], "label": "teapot", "weight": 1.0}},
        "5": {"class_type": "TroupeSubjectList", "inputs": {"subject_1": ["3", 0], "subject_2": ["4", 0]}},
        "tiny": {"class_type": "TroupeTestTinyAlignGen", "inputs": {"seed": 0}},
        "8": {"class_type": "TroupeTestTinyVAE", "inputs": {"kind": "flux", "seed": 0}},
        "t": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["tiny", 1], "text": prompt}},
        "n": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["tiny", 1], "text": ""}},
        **redux,
        "9": {"class_type": "TroupeReferenceBranch", "inputs": {
            "model": ["tiny", 0], "vae": ["8", 0], "subjects": ["5", 0], "prompt": prompt, "reference_size": 64,
            "reference_timestep": 0.0, "reference_guidance": 1.0, "reference_attention": "joint",
            "selective_text": True, "region": False, "lora_name": lora, "lora_strength": 1.0, "dem_name": dem,
            "clip": ["tiny", 1]}},
        "12": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["9", 0], "positive": ["r2", 0], "negative": ["n", 0], "latent_image": ["12", 0], "seed": 0,
            "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["8", 0]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "aligngen_trained"}},
    }


def saved(server, entry) -> np.ndarray:
    (image,) = entry["outputs"]["15"]["images"]
    return np.asarray(Image.open(server.image_path(image)).convert("RGB")).astype(int)


def test_trained_s_star_dem_and_lora_load_and_sample(server, artifacts):
    """The node finds S* (the embedding) right before each label, loads the DEM in its T5-input form and the rank-16
    troupe LoRA, and the image differs from the same graph without DEM and LoRA."""
    entry = server.run(workflow(DEM, LORA))
    report = entry["outputs"]["9"]["text"][0]
    assert "S* = the T5 input embedding before each label" in report, report
    assert "troupe LoRA, rank 16" in report, report
    image = saved(server, entry)
    assert image.shape == (SIZE, SIZE, 3)
    plain = saved(server, server.run(workflow("none", "none")))
    assert np.abs(image - plain).max() > 0
    Image.fromarray(image.astype(np.uint8)).save(artifacts / "aligngen_trained.png")


def test_a_label_without_s_star_is_refused_naming_the_prompt(server):
    with pytest.raises(PromptError, match=r"TroupeReferenceBranch: input 'prompt': no S\* embedding right before the "
                                        r"label 'teapot'"):
        server.run(workflow(DEM, LORA, PROMPT.replace("embedding:aligngen_s_star teapot", "teapot")))
