"""TroupeReferenceBranch and TroupeAttentionMaskPreview in the real ComfyUI 0.3.75 server, on the tiny FLUX.

Two real photos (assets/) become two references; the prompt text is tokenized with ComfyUI's own T5
tokenizer (no text encoder weights); a MOSAIC-layout LoRA file sits in models/troupe.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from comfy_server import PromptError
from fixtures.reference_loras import mosaic_lora_state_dict
from fixtures.tiny_models import write_checkpoint
from fixtures.troupe_graphs import copy_photos, reference_branch_graph
from PIL import Image
from workflow_api import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
SIZE = 128
PROMPT_TEXT = "a corgi sitting next to a teapot on a table"


@pytest.fixture(scope="module")
def server(comfy_server):
    copy_photos(comfy_server)
    write_checkpoint(comfy_server.models_dir / "troupe" / "mosaic_tiny_lora.safetensors", mosaic_lora_state_dict())
    from comfyui_troupe.models.reference.dem import DeviationExtractionModule

    dem = DeviationExtractionModule(dim=4096, redux_dim=4096, heads=2, mlp_ratio=64 / 4096, inner=64)
    write_checkpoint(comfy_server.models_dir / "troupe" / "tiny_dem.safetensors", dem.state_dict(),
                     metadata={"format": "troupe.dem", "heads": "2"})
    return comfy_server


def branch_prompt(lora="none", attention="joint", selective=True, region=True, text=PROMPT_TEXT,
                  labels=("corgi", "teapot"), dem="none") -> dict:
    p = reference_branch_graph(SIZE, text, lora=lora, attention=attention, selective=selective, region=region,
                               labels=labels, dem=dem)
    p["16"] = {"class_type": "TroupeAttentionMaskPreview", "inputs": {"model": ["9", 0], "width": SIZE,
                                                                      "height": SIZE}}
    return p


def saved(server, entry, node="15"):
    images = entry["outputs"][node]["images"]
    return [np.asarray(Image.open(server.image_path(i)).convert("RGB")).astype(int) for i in images]


@pytest.mark.parametrize("lora,attention", [("none", "joint"), ("mosaic_tiny_lora.safetensors", "joint"),
                                            ("mosaic_tiny_lora.safetensors", "self_cached")])
def test_two_reference_workflow_runs_end_to_end(server, artifacts, lora, attention):
    entry = server.run(branch_prompt(lora=lora, attention=attention))
    (image,) = saved(server, entry)
    assert image.shape == (SIZE, SIZE, 3)
    report = entry["outputs"]["9"]["text"][0]
    assert "2 reference(s) of 2 subject(s)" in report and "'corgi': T5 tokens [2, 3, 4]" in report
    assert ("mosaic LoRA, rank 4" in report) == (lora != "none")
    assert "DEM: none: running the reference branch and masks alone" in report
    (mask,) = saved(server, entry, "16")
    assert mask.shape[0] == mask.shape[1] and mask.max() > 200
    Image.fromarray(mask.astype(np.uint8)).save(artifacts / f"reference_attention_mask_{attention}.png")


def test_label_missing_from_the_prompt_names_node_and_input(server):
    with pytest.raises(PromptError, match=r"TroupeReferenceBranch: input 'prompt': the subject label 'teapot' is not"):
        server.run(branch_prompt(text="a corgi on a table"))


def test_unknown_lora_file_is_refused_at_queue_time(server):
    with pytest.raises(PromptError) as err:
        server.queue(branch_prompt(lora="missing.safetensors"))
    assert "TroupeReferenceBranch: input 'lora_name': no file 'missing.safetensors'" in json.dumps(err.value.payload)


@pytest.mark.parametrize("name", ["flux_mosaic_multi_subject.json", "flux_reference_align.json"])
def test_shipped_workflows_convert_and_name_the_branch(server, name):
    workflow = json.loads((ROOT / "example_workflows" / name).read_text())
    prompt = ui_to_api(workflow, server.object_info())
    kinds = {n["class_type"] for n in prompt.values()}
    assert {"TroupeReferenceBranch", "TroupeAttentionMaskPreview", "KSampler"} <= kinds
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and any("models/troupe" in " ".join(map(str, n["widgets_values"])) for n in notes)


def test_dem_file_loads_and_asks_for_the_redux_tokens(server):
    """The DEM file loads; without StyleModelApply (Redux) tokens in the conditioning the run stops and says so."""
    with pytest.raises(PromptError, match=r"the DEM needs each subject's Redux tokens.*StyleModelApply"):
        server.run(branch_prompt(dem="tiny_dem.safetensors"))


def chained_prompt(dem: str = "none") -> dict:
    """TroupeReferenceBranch -> TroupeReferenceBranch (the second with the MOSAIC LoRA, self_cached) -> KSampler,
    and the first branch alone through its own sampler (node 20) for comparison."""
    p = branch_prompt(selective=False, region=False)
    p["17"] = dict(p["9"], inputs=dict(p["9"]["inputs"], model=["9", 0], lora_name="mosaic_tiny_lora.safetensors",
                                       reference_attention="self_cached", dem_name=dem))
    p["13"]["inputs"]["model"] = ["17", 0]
    p["20"] = dict(p["13"], inputs=dict(p["13"]["inputs"], model=["9", 0]))
    p["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["8", 0]}}
    p["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "reference_one"}}
    return p


def test_two_chained_branches_join_one_attention(server):
    """A second TroupeReferenceBranch after the first adds its references (its own run state, one joint attention):
    the report says so and the image differs from the first branch's alone."""
    entry = server.run(chained_prompt())
    assert "joins 1 reference branch(es) already on the model" in entry["outputs"]["17"]["text"][0]
    (chained,), (one,) = saved(server, entry), saved(server, entry, "22")
    assert np.abs(chained - one).max() > 0


def test_a_dem_branch_is_not_chained(server):
    with pytest.raises(PromptError, match=r"TroupeReferenceBranch: input 'dem_name': a reference branch with S\* \+ DEM"):
        server.run(chained_prompt(dem="tiny_dem.safetensors"))
