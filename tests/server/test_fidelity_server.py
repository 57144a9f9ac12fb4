"""TroupeFidelity in the real server: OpenCLIP from models/openclip and DINOv2 from models/dino (local files only),
on MS-Bench photos pasted into MS-Bench boxes; the image-text node from ComfyUI's CLIP; refusals at queue time."""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from fixtures.pasted_msbench import pasted_case
from fixtures.tiny_models import tiny_hf_dinov2_folder
from fixtures.tiny_openclip import tiny_openclip_folder
from PIL import Image

OPENCLIP, DINO = "tiny-openclip-server", "tiny-dinov2-fidelity"


@pytest.fixture(scope="module")
def case(comfy_server, msbench):
    """The pasted image and each subject's reference as PNGs in the input folder, the models in their folders."""
    tiny_openclip_folder(comfy_server.models_dir / "openclip" / OPENCLIP)
    tiny_hf_dinov2_folder(comfy_server.models_dir / "dino" / DINO, layers=2)
    image, layout, refs = pasted_case(msbench, "living_living_living")
    names = {"image": "fidelity_pasted.png"}
    Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(comfy_server.input_dir / names["image"])
    for r in refs:
        names[r.label] = f"fidelity_{r.label}.png"
        arr = (r.images[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(comfy_server.input_dir / names[r.label])
    boxes = {"version": 1, "boxes": [dict(zip(("x0", "y0", "x1", "y1"), r.box)) for r in layout.regions]}
    return names, [r.label for r in refs], json.dumps(boxes)


def graph(case, model_name: str = OPENCLIP, dino_model: str = DINO) -> dict:
    names, labels, boxes = case
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": names["image"]}},
         "2": {"class_type": "TroupeLoadOpenCLIP", "inputs": {"model_name": model_name, "architecture": ""}},
         "9": {"class_type": "TroupeSubjectList", "inputs": {}}}
    for k, label in enumerate(labels, start=1):
        g[f"1{k}"] = {"class_type": "LoadImage", "inputs": {"image": names[label]}}
        g[f"2{k}"] = {"class_type": "TroupeSubject", "inputs": {"image": [f"1{k}", 0], "label": label, "weight": 1.0}}
        g["9"]["inputs"][f"subject_{k}"] = [f"2{k}", 0]
    g["8"] = {"class_type": "TroupeLayout", "inputs": {"width": 512, "height": 512, "boxes": boxes,
                                                       "subjects": ["9", 0]}}
    g["7"] = {"class_type": "TroupeFidelity", "inputs": {
        "image": ["1", 0], "subjects": ["9", 0], "layout": ["8", 0], "image_text": ["2", 0],
        "prompt": "a cat, a dog2, and a dog5 in a room", "crop": "pad", "dino_model": dino_model,
        "dino_resolution": 112}}
    return g


def test_openclip_and_dino_folders_score_a_pasted_msbench_case(comfy_server, case):
    info = comfy_server.object_info()
    assert OPENCLIP in info["TroupeLoadOpenCLIP"]["input"]["required"]["model_name"][1]["options"]
    assert DINO in info["TroupeFidelity"]["input"]["required"]["dino_model"][1]["options"]
    assert info["TroupeFidelity"]["output"] == ["IMAGE", "STRING"]
    entry = comfy_server.run(graph(case))
    out = entry["outputs"]["7"]
    scores = json.loads(out["text"][0])
    assert scores["backbones"] == {"clip_image": f"OpenCLIP {OPENCLIP}, 64 px",
                                   "clip_text": f"OpenCLIP {OPENCLIP}, 64 px, text tower",
                                   "dino": f"{DINO} (dinov2), 112 px, CLS token"}
    for name in ("clip_i", "dino"):
        m = np.array(scores["matrices"][name]["matrix"])
        assert m.shape == (3, 3)
        for i in range(3):  # each region's crop is its reference: own beats every other subject
            assert m[i, i] > max(m[i, j] for j in range(3) if j != i), (name, m)
    assert -1 <= scores["clip_t"] <= 1 and [s["label"] for s in scores["subjects"]] == ["cat", "dog2", "dog5"]
    (heat,) = out["images"]
    assert comfy_server.image_path(heat).exists()
    text = entry["outputs"]["2"]["text"][0]
    assert "metrics: clip_i, clip_t" in text


def queue_errors(comfy_server, prompt: dict) -> str:
    """The node errors /prompt answers with: a 400 when no output validates, else a 200 that still lists them (the
    outputs that validated, here TroupeLoadOpenCLIP's summary, run anyway)."""
    r = requests.post(f"{comfy_server.url}/prompt", json={"prompt": prompt}, timeout=60)
    body = r.json()
    assert body.get("node_errors"), body
    return json.dumps(body["node_errors"])


def test_missing_model_files_are_refused_when_queued(comfy_server, case):
    errors = queue_errors(comfy_server, graph(case, model_name="ViT-L-14-missing"))
    assert "TroupeLoadOpenCLIP: input 'model_name': no OpenCLIP folder or file 'ViT-L-14-missing' in models/openclip" \
        in errors
    errors = queue_errors(comfy_server, graph(case, dino_model="no-such-dino"))
    assert "TroupeFidelity: input 'dino_model': no folder 'no-such-dino'" in errors


def test_comfy_clip_vision_and_text_through_the_server(comfy_server, case):
    g = graph(case, dino_model="none")
    g["2"] = {"class_type": "TroupeImageTextCLIP", "inputs": {"clip_vision": ["3", 0], "clip": ["4", 0]}}
    g["3"] = {"class_type": "TroupeTestTinyCLIPVision", "inputs": {"layers": 4, "seed": 0}}
    g["4"] = {"class_type": "TroupeTestTinySDXLCLIP", "inputs": {"width_l": 48, "width_g": 16, "seed": 0}}
    g["5"] = {"class_type": "TroupeTestTinyDINOv2", "inputs": {"layers": 2, "seed": 0}}
    g["7"]["inputs"]["dino_vision"] = ["5", 0]
    scores = json.loads(comfy_server.run(g)["outputs"]["7"]["text"][0])
    assert scores["backbones"]["clip_text"] == "ComfyUI CLIP text clip_l (projection 48)"
    assert scores["backbones"]["dino"].startswith("DINOv2 (ComfyUI, 2 layers")
    assert scores["clip_t"] is not None and set(scores["matrices"]) == {"clip_i", "dino"}
