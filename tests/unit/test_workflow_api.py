"""The UI -> API workflow converter used by the demo and the workflow tests."""
import json
from pathlib import Path

from workflow_api import ui_to_api

OBJECT_INFO = {
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
            "sampler_name": [["euler", "dpmpp_2m"], {}], "positive": ["CONDITIONING", {}],
        }},
        "input_order": {"required": ["model", "seed", "steps", "sampler_name", "positive"]},
    },
    "LoadImage": {"input": {"required": {"image": [["a.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}},
    "TroupeLayout": {
        "input": {"required": {"width": ["INT", {}], "height": ["INT", {}], "boxes": ["STRING", {"multiline": True}]},
                  "optional": {"subjects": ["TROUPE_SUBJECTS", {}]}},
        "input_order": {"required": ["width", "height", "boxes"], "optional": ["subjects"]},
    },
}


def test_positional_widgets_links_and_extra_values():
    workflow = {
        "nodes": [
            {"id": 1, "type": "LoadImage", "inputs": [], "widgets_values": ["a.png", "image"]},
            {"id": 2, "type": "KSampler", "widgets_values": [42, "fixed", 4, "euler"],
             "inputs": [{"name": "model", "link": 1}, {"name": "positive", "link": 2},
                        {"name": "steps", "link": 3, "widget": {"name": "steps"}}]},
            {"id": 3, "type": "Note", "widgets_values": ["ignored"]},
            {"id": 4, "type": "TroupeLayout", "mode": 4, "widgets_values": [64, 64, "{}"]},
        ],
        "links": [[1, 9, 0, 2, 0, "MODEL"], [2, 8, 1, 2, 4, "CONDITIONING"], [3, 7, 0, 2, 2, "INT"]],
    }
    prompt = ui_to_api(workflow, OBJECT_INFO)
    assert prompt["1"] == {"class_type": "LoadImage", "inputs": {"image": "a.png"}}
    assert prompt["2"]["inputs"] == {"model": ["9", 0], "seed": 42, "steps": ["7", 0], "sampler_name": "euler",
                                     "positive": ["8", 1]}
    assert "3" not in prompt and "4" not in prompt  # notes and bypassed nodes are not sent


def test_every_image_a_shipped_workflow_loads_ships_in_assets():
    """Users open these workflows with the pack alone: each LoadImage names one of the shipped photos."""
    root = Path(__file__).resolve().parents[2]
    shipped = {p.name for p in (root / "assets").glob("*.jpg")}
    for path in sorted((root / "example_workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                assert node["widgets_values"][0] in shipped, (path.name, node["widgets_values"][0])
