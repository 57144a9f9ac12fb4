"""FLUX Redux through ComfyUI's own StyleModelApply, both strength modes, into TroupeReferenceBranch's DEM in the
real server (tiny FLUX; a Redux-shaped style model and 729 SigLIP-384 tokens per subject from a test node).

In ``attn_bias`` mode StyleModelApply adds an attention mask sized for the Redux tokens; the branch's DEM consumes
those tokens and removes them, so it re-indexes the mask with them: the run completes, and since the bias only
ever touched the removed Redux columns, attn_bias gives the image that multiply at strength 1 gives. (How the
strength changes what the DEM reads shows in the latents, below 8-bit pixels on the tiny model:
tests/unit/test_redux_dem.py.)
"""
from __future__ import annotations

import numpy as np
import pytest
from fixtures.tiny_models import write_checkpoint
from fixtures.troupe_graphs import copy_photos, reference_branch_graph
from PIL import Image

SIZE = 64
PROMPT = "a corgi sitting next to a teapot on a table"


@pytest.fixture(scope="module")
def server(comfy_server):
    copy_photos(comfy_server)
    from comfyui_troupe.models.reference.dem import DeviationExtractionModule

    dem = DeviationExtractionModule(dim=4096, redux_dim=4096, heads=2, mlp_ratio=64 / 4096, inner=64)
    write_checkpoint(comfy_server.models_dir / "troupe" / "tiny_dem_redux.safetensors", dem.state_dict(),
                     metadata={"format": "troupe.dem", "heads": "2"})
    return comfy_server


def prompt(strength: float, mode: str) -> dict:
    """The two-photo branch with the Redux DEM, each subject's Redux tokens added by ComfyUI's StyleModelApply."""
    p = reference_branch_graph(SIZE, PROMPT, region=False, dem="tiny_dem_redux.safetensors", steps=2,
                               prefix=f"redux_{mode}")
    p["20"] = {"class_type": "TroupeTestTinyRedux", "inputs": {"seed": 0}}
    p["21"] = {"class_type": "StyleModelApply", "inputs": {"conditioning": ["10", 0], "style_model": ["20", 0],
                                                           "clip_vision_output": ["20", 1], "strength": strength,
                                                           "strength_type": mode}}
    p["22"] = {"class_type": "TroupeTestTinyRedux", "inputs": {"seed": 1}}
    p["23"] = {"class_type": "StyleModelApply", "inputs": {"conditioning": ["21", 0], "style_model": ["22", 0],
                                                           "clip_vision_output": ["22", 1], "strength": strength,
                                                           "strength_type": mode}}
    p["13"]["inputs"]["positive"] = ["23", 0]
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
