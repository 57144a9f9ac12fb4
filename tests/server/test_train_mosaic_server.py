"""A mosaic-trained reference LoRA in the real ComfyUI server: a short run on the tiny FLUX fixture (in this test
process, the trainer's own entry point), the file copied into models/troupe as it is, then TroupeReferenceBranch
loads it and a two-subject workflow samples with it, "as trained" positions included."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from fixtures.training_flux import flux_components
from fixtures.training_mosaic import mosaic_config, mosaic_dataset
from fixtures.troupe_graphs import copy_photos, reference_branch_graph
from PIL import Image

from comfyui_troupe.training.trainer import train

NAME = "mosaic_trained_tiny.safetensors"
SIZE = 128
PROMPT_TEXT = "a corgi sitting next to a teapot on a table"


@pytest.fixture(scope="module")
def server(comfy_server, msbench, module_tmp):
    """The server with the two reference photos in input/ and a freshly trained mosaic LoRA in models/troupe."""
    manifest = mosaic_dataset(module_tmp / "mosaic" / "data", msbench, records=4)
    result = train(mosaic_config(module_tmp / "mosaic", manifest, steps=4), flux_components(), show_bar=False)
    shutil.copy(result.adapter_path, comfy_server.models_dir / "troupe" / NAME)
    copy_photos(comfy_server)
    return comfy_server


def branch_prompt(lora: str) -> dict:
    return reference_branch_graph(SIZE, PROMPT_TEXT, lora=lora, lora_strength=2.0, selective=False, region=False,
                                  prefix="mosaic_trained")


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
