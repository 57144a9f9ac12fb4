"""The pack in the real ComfyUI 0.3.75 server: registration, API-format workflows, clear errors."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from comfy_server import PromptError
from PIL import Image
from workflow_api import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
PACK_NODES = {
    "TroupeSubject", "TroupeSubjectList", "TroupeLayout", "TroupeLayoutFromMasks", "TroupeLayoutToMasks",
    "TroupeLayoutPreview", "TroupeLoadFusion", "TroupeEncodeSubjects", "TroupeGranularity",
    "TroupeFusionWeightsPreview", "TroupeEncodeDINO", "TroupeLoadAdapter",
    "TroupeApplySDXL", "TroupeRoutingPreview",
    "TroupeApplyFLUX",
    "TroupeReferenceBranch", "TroupeAttentionMaskPreview",
    "TroupeLoadOpenCLIP", "TroupeImageTextCLIP", "TroupeFidelity", "TroupeAttentionMaps", "TroupeAttentionMapsRender",
    "TroupeTrainAdapter",
}
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231"]


def rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def boxes_json(*boxes) -> str:
    return json.dumps({"version": 1, "boxes": [dict(zip(("x0", "y0", "x1", "y1"), b)) for b in boxes]})


def layout_prompt(boxes: str, width: int = 256, height: int = 128) -> dict:
    return {
        "1": {"class_type": "TroupeLayout", "inputs": {"width": width, "height": height, "boxes": boxes}},
        "2": {"class_type": "TroupeLayoutPreview", "inputs": {"layout": ["1", 0]}},
    }


def output_images(server, entry: dict, node_id: str) -> list[np.ndarray]:
    images = entry["outputs"][node_id]["images"]
    return [np.asarray(Image.open(server.image_path(i)).convert("RGB")).astype(int) for i in images]


def test_every_node_is_registered_with_tooltips(comfy_server):
    info = comfy_server.object_info()
    troupe = {k for k, v in info.items() if k.startswith("Troupe") and not k.startswith("TroupeTest")}
    assert troupe == PACK_NODES
    for name in PACK_NODES:
        node = info[name]
        assert node["category"].startswith("Troupe/"), name
        assert node["description"], f"{name} has no description"
        assert node["python_module"].endswith("ComfyUI-Troupe"), node["python_module"]
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    # the test-only nodes come from tests/custom_nodes, never from the shipped pack
    test_nodes = [k for k in info if k.startswith("TroupeTest")]
    assert all("ComfyUI-Troupe" not in info[k]["python_module"] for k in test_nodes)


def test_server_log_has_no_pack_import_error(comfy_server):
    log = comfy_server.log()
    assert re.search(r"seconds: .*custom_nodes/ComfyUI-Troupe", log), log[-3000:]
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if "Troupe" in line or "troupe" in line], failed
    assert not [line for line in log.splitlines() if "Cannot import" in line and "Troupe" in line]
    # every traceback while starting up (the audio nodes fail without torchaudio: harmless) is outside the pack;
    # later tracebacks come from the tests that run bad workflows on purpose
    startup = log.split("got prompt", 1)[0]
    for block in re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+.*", startup):
        assert "ComfyUI-Troupe" not in block, block


def test_web_directory_serves_the_editor(comfy_server):
    exts = comfy_server.get("/extensions").json()
    assert any(e.startswith("/extensions/ComfyUI-Troupe/") for e in exts), exts


def test_layout_basics_workflow_runs(comfy_server):
    """example_workflows/layout_basics.json (the demo) through /prompt: preview boxes at the right pixels."""
    for image in (ROOT / "assets").glob("*.jpg"):
        shutil.copy(image, comfy_server.input_dir / image.name)
    workflow = json.loads((ROOT / "example_workflows" / "layout_basics.json").read_text())
    prompt = ui_to_api(workflow, comfy_server.object_info())
    assert prompt["6"]["inputs"]["subjects"] == ["5", 0]
    entry = comfy_server.run(prompt)
    saved = output_images(comfy_server, entry, "9")[0]
    assert saved.shape == (1024, 1024, 3)
    # boxes [0, .25, .5, .75] and [.5, .25, 1, .75]; outline width max(2, round(1024 / 170)) = 6
    assert np.abs(saved[512, 0] - rgb(PALETTE[0])).max() <= 2  # left edge of box 1
    assert np.abs(saved[512, 1023] - rgb(PALETTE[1])).max() <= 2  # right edge of box 2
    assert np.abs(saved[767, 256] - rgb(PALETTE[0])).max() <= 2  # bottom edge of box 1
    assert np.abs(saved[100, 512] - 31).max() <= 1  # blank canvas outside the boxes (grey 0.12)
    masks = entry["outputs"]["8"]["images"]
    assert masks, "TroupeLayoutToMasks shows a mask preview"


def test_masks_round_trip_through_layout_from_masks(comfy_server):
    boxes = boxes_json((0.125, 0.25, 0.5, 0.75), (0.5, 0.0, 0.875, 1.0))
    prompt = {
        "1": {"class_type": "TroupeLayout", "inputs": {"width": 256, "height": 128, "boxes": boxes}},
        "2": {"class_type": "TroupeLayoutToMasks", "inputs": {"layout": ["1", 0], "width": 0, "height": 0,
                                                              "edge": "binary", "overlap": "share", "feather": 0.0}},
        "3": {"class_type": "TroupeLayoutFromMasks", "inputs": {"masks": ["2", 0], "width": 0, "height": 0}},
        "4": {"class_type": "TroupeLayoutToMasks", "inputs": {"layout": ["3", 0], "width": 64, "height": 32,
                                                              "edge": "coverage", "overlap": "share", "feather": 0.0}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "troupe_test/masks"}},
    }
    entry = comfy_server.run(prompt)
    first, second = output_images(comfy_server, entry, "6")
    assert first.shape == (32, 64, 3)
    on = first[..., 0] > 127
    assert on[8:24, 8:32].all() and on.sum() == 16 * 24
    on2 = second[..., 0] > 127
    assert on2[:, 32:56].all() and on2.sum() == 32 * 24


BAD_BOXES = [
    ("{oops", "not valid JSON"),
    (boxes_json((0.2, 0.2, 0.1, 0.5)), "zero or negative area"),
    (boxes_json((0.2, 0.2, 1.2, 0.5)), "out of range"),
]


@pytest.mark.parametrize("boxes,message", BAD_BOXES)
def test_bad_boxes_are_refused_before_running(comfy_server, boxes, message):
    with pytest.raises(PromptError) as err:
        comfy_server.queue(layout_prompt(boxes))
    errors = err.value.payload["node_errors"]["1"]["errors"]
    assert errors[0]["type"] == "custom_validation_failed"
    assert "TroupeLayout" in errors[0]["details"] and message in errors[0]["details"]
    assert errors[0]["details"].startswith("boxes")


def test_empty_layout_and_subject_mismatch_name_the_node_and_input(comfy_server):
    with pytest.raises(PromptError, match=r"TroupeLayout: input 'boxes': no boxes"):
        comfy_server.run(layout_prompt(boxes_json()))
    shutil.copy(ROOT / "assets" / "troupe_dog.jpg", comfy_server.input_dir / "troupe_dog.jpg")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "troupe_dog.jpg"}},
        "2": {"class_type": "TroupeSubject", "inputs": {"image": ["1", 0], "label": "dog", "weight": 1.0}},
        "3": {"class_type": "TroupeSubjectList", "inputs": {"subject_1": ["2", 0]}},
        "4": {"class_type": "TroupeLayout", "inputs": {"width": 256, "height": 256, "subjects": ["3", 0],
                                                       "boxes": boxes_json((0, 0, 0.5, 1), (0.5, 0, 1, 1))}},
        "5": {"class_type": "TroupeLayoutPreview", "inputs": {"layout": ["4", 0]}},
    }
    with pytest.raises(PromptError, match=r"2 boxes but 1 subjects"):
        comfy_server.run(prompt)
    prompt["2"]["inputs"]["label"] = "  "
    with pytest.raises(PromptError, match=r"TroupeSubject: input label: give the word"):
        comfy_server.run(prompt)


@pytest.mark.parametrize("path", sorted((ROOT / "example_workflows").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_workflow_names_only_known_nodes(comfy_server, path):
    """Workflows double as fixtures: each converts to API format against the live server's node list."""
    workflow = json.loads(path.read_text())
    assert workflow.get("version") == 0.4 and workflow["nodes"], "UI-format workflow expected"
    prompt = ui_to_api(workflow, comfy_server.object_info())
    assert prompt and all(n["class_type"] for n in prompt.values())
