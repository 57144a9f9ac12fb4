"""TroupeApplyFLUX in the real ComfyUI 0.3.75 server: example_workflows/flux_multi_subject.json with three MS-Bench
subjects and a layout, its loaders swapped for the tiny test models (TroupeTestTinyFLUX, TroupeTestTinyCLIPVision,
TroupeTestConditioning kind flux, TroupeTestTinyVAE) and a tiny troupe-flux adapter in models/troupe."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from fixtures.flux_adapters import troupe_flux_state_dict
from PIL import Image
from safetensors.torch import save_file
from workflow_api import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = "flux_tiny_troupe.safetensors"
FUSION = "flux_tiny_hmoe_w64.safetensors"
FUSED = 32  # the tiny fusion's expert width = the adapter's encoder width
SIZE = 128
PHOTOS = {"troupe_dog.jpg": "images/living/dog.jpg", "troupe_cat.jpg": "images/living/cat.jpg",
          "troupe_teapot.jpg": "images/object/backpack.jpg"}


def write_fusion(path: Path, in_dim: int = 64, out_dim: int = FUSED, seed: int = 0) -> None:
    """HMoE weights in the documented key layout (experts.{l}.0 / .2, router.0 / .2) for the tiny CLIP vision."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for level in range(3):
        sd[f"experts.{level}.0.weight"] = torch.randn(out_dim, in_dim, generator=g) * 0.1
        sd[f"experts.{level}.0.bias"] = torch.zeros(out_dim)
        sd[f"experts.{level}.2.weight"] = torch.ones(out_dim)
        sd[f"experts.{level}.2.bias"] = torch.zeros(out_dim)
    sd["router.0.weight"] = torch.randn(16, 3 * in_dim, generator=g) * 0.05
    sd["router.0.bias"] = torch.zeros(16)
    sd["router.2.weight"] = torch.randn(3, 16, generator=g)
    sd["router.2.bias"] = torch.zeros(3)
    save_file(sd, str(path), metadata={"format": "troupe.hmoe", "version": "1", "layers": "10,17,24"})


@pytest.fixture(scope="module")
def files(comfy_server, msbench):
    troupe = comfy_server.models_dir / "troupe"
    troupe.mkdir(parents=True, exist_ok=True)
    save_file(troupe_flux_state_dict(encoder_dim=FUSED), str(troupe / ADAPTER))
    write_fusion(troupe / FUSION)
    for name, rel in PHOTOS.items():
        shutil.copy(msbench / rel, comfy_server.input_dir / name)
    return troupe


def tiny_prompt(comfy_server, weight: float = 1.0, branches: str = "image branch only") -> dict:
    """example_workflows/flux_multi_subject.json in API format with the tiny test models in place of the real files."""
    workflow = json.loads((ROOT / "example_workflows" / "flux_multi_subject.json").read_text())
    p = ui_to_api(workflow, comfy_server.object_info())
    kinds = {v["class_type"] for v in p.values()}
    assert {"UNETLoader", "DualCLIPLoader", "CLIPVisionLoader", "VAELoader", "TroupeLoadFusion", "TroupeLoadAdapter",
            "TroupeEncodeSubjects", "TroupeLayout", "TroupeApplyFLUX", "KSampler"} <= kinds
    assert sum(v["class_type"] == "TroupeSubject" for v in p.values()) == 3
    cond = {"kind": "flux", "batch": 1, "width": SIZE, "height": SIZE, "tokens": 32, "guidance": 3.5}
    p["2"] = {"class_type": "TroupeTestTinyFLUX", "inputs": {"schnell": False, "seed": 0}}
    p["4"] = {"class_type": "TroupeTestConditioning", "inputs": dict(cond, seed=1)}
    p["6"] = {"class_type": "TroupeTestConditioning", "inputs": dict(cond, seed=2)}
    del p["3"]
    p["7"] = {"class_type": "TroupeTestTinyVAE", "inputs": {"kind": "flux", "seed": 0}}
    p["8"] = {"class_type": "TroupeTestTinyCLIPVision", "inputs": {"layers": 24, "seed": 0}}
    p["9"]["inputs"]["fusion_name"] = FUSION
    p["10"]["inputs"]["adapter_name"] = ADAPTER
    p["19"]["inputs"].update(width=SIZE, height=SIZE)
    p["20"]["inputs"].update(weight=weight, branches=branches)
    p["21"]["inputs"].update(width=SIZE, height=SIZE)
    p["22"]["inputs"].update(steps=3)
    p["24"]["inputs"]["filename_prefix"] = f"flux_{weight}_{branches[:4]}"
    # the base model through the same sampler and VAE, for comparison
    p["30"] = dict(p["22"], inputs=dict(p["22"]["inputs"], model=["2", 0]))
    p["31"] = {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["7", 0]}}
    p["32"] = {"class_type": "SaveImage", "inputs": {"images": ["31", 0], "filename_prefix": "flux_base"}}
    return p


def image(server, entry: dict, node: str) -> np.ndarray:
    (img,) = entry["outputs"][node]["images"]
    return np.asarray(Image.open(server.image_path(img))).astype(np.int16)


def test_three_subjects_with_a_layout_run_end_to_end(comfy_server, files):
    entry = comfy_server.run(tiny_prompt(comfy_server))
    report = entry["outputs"]["10"]["text"][0]
    assert "troupe-flux (FLUX)" in report and "2 double + 2 single" in report
    patched, base = image(comfy_server, entry, "24"), image(comfy_server, entry, "32")
    assert patched.shape == base.shape == (SIZE, SIZE, 3)
    assert np.abs(patched - base).max() > 0
    assert entry["outputs"]["25"]["images"], "the layout preview over the result"


def test_weight_zero_gives_the_base_image_and_both_branches_differs(comfy_server, files):
    entry = comfy_server.run(tiny_prompt(comfy_server, weight=0.0))
    assert np.array_equal(image(comfy_server, entry, "24"), image(comfy_server, entry, "32"))
    img_only = image(comfy_server, comfy_server.run(tiny_prompt(comfy_server)), "24")
    both = image(comfy_server, comfy_server.run(tiny_prompt(comfy_server, branches="both branches")), "24")
    assert np.abs(both - img_only).max() > 0


def test_unknown_branches_value_is_refused_at_queue_time(comfy_server, files):
    """validate_inputs names the input; the sampler branch is refused (TroupeLoadAdapter, an output node
    itself, may still run, so the answer is read from node_errors rather than from a refused queue)."""
    prompt = tiny_prompt(comfy_server, branches="text only")
    for node in ("30", "31", "32"):
        del prompt[node]
    r = requests.post(f"{comfy_server.url}/prompt", json={"prompt": prompt, "client_id": "flux-validate"}, timeout=60)
    errors = json.dumps(r.json().get("node_errors", {}))
    assert ("TroupeApplyFLUX: input 'branches': expected one of as trained, image branch only, both branches, "
            "whole stream in single blocks (InstantX)") in errors
    if r.status_code == 200:  # the adapter loader ran on its own: let it finish before the next test
        comfy_server.wait(r.json()["prompt_id"])


def test_two_chained_apply_nodes_both_act_and_weight_zero_leaves_the_first(comfy_server, files):
    """Two TroupeApplyFLUX in a chain (each with its own run state): the image differs from one node's; the second
    at weight 0 gives the first node's image exactly."""
    def chained(weight: float) -> dict:
        p = tiny_prompt(comfy_server)
        p["40"] = dict(p["20"], inputs=dict(p["20"]["inputs"], model=["20", 0], weight=weight))
        p["41"] = dict(p["22"], inputs=dict(p["22"]["inputs"], model=["40", 0]))
        p["42"] = {"class_type": "VAEDecode", "inputs": {"samples": ["41", 0], "vae": ["7", 0]}}
        p["43"] = {"class_type": "SaveImage", "inputs": {"images": ["42", 0], "filename_prefix": f"flux_chain_{weight}"}}
        return p

    entry = comfy_server.run(chained(0.5))
    one, two = image(comfy_server, entry, "24"), image(comfy_server, entry, "43")
    assert np.abs(two - one).max() > 0
    entry = comfy_server.run(chained(0.0))
    assert np.array_equal(image(comfy_server, entry, "43"), image(comfy_server, entry, "24"))
