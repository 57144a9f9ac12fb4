"""Issue 15: each example workflow queued without its model files names each missing file once per node.

ComfyUI 0.3.75 attaches a failed ``validate_inputs`` result to every input the function declares (one log line
and one ``node_errors`` entry each), so a Troupe node that checks a file declares only that input. ComfyUI then
logs a node's errors once under the node ("* TroupeLoadAdapter 10:") and, when the node is an output node (the
loaders and the reference branch show a preview), once more under that output ("* (prompt):"); its one-line
"invalid prompt: {...}" summary repeats them again. docs/queue-errors.md has the measured counts.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
from workflow_api import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
FILE_INPUTS = {"adapter_name", "fusion_name", "lora_name", "dino_model", "model_name"}  # checked at queue time
MISSING = re.compile(r"(Troupe\w+): input '(\w+)': no file '([^']+)'")


def validation_block(server, prompt: dict) -> tuple[list[str], dict]:
    """The log lines ComfyUI writes while refusing ``prompt`` (up to its summary line), and its JSON answer."""
    before = len(server.log())
    r = requests.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": "queue-errors"}, timeout=60)
    answer = r.json()
    if r.status_code == 200:  # an output node with its files (none here) would run: let it finish
        server.wait(answer["prompt_id"])
    deadline = time.monotonic() + 10
    while "invalid prompt:" not in server.log()[before:] and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = server.log()[before:].splitlines()
    end = next((i for i, line in enumerate(lines) if "invalid prompt:" in line), len(lines))
    return lines[:end], answer


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_a_missing_file_is_named_once_per_node(comfy_server, path: Path):
    info = comfy_server.object_info()
    prompt = ui_to_api(json.loads(path.read_text()), info)
    expected = {(n["class_type"], name, value) for n in prompt.values() if n["class_type"].startswith("Troupe")
                for name, value in n["inputs"].items() if name in FILE_INPUTS and value != "none"}
    lines, answer = validation_block(comfy_server, prompt)
    counts: dict[tuple[str, str, str], int] = {}
    for line in lines:
        for found in MISSING.findall(line):
            counts[found] = counts.get(found, 0) + 1
    assert set(counts) == expected, "\n".join(lines)
    for (node, name, file), count in counts.items():
        output = bool(info[node].get("output_node"))  # logged under its node and under "* (prompt):"
        assert count == 1 + output, f"'{file}' ({node}.{name}) named {count} times:\n" + "\n".join(lines)
    for node_id, entry in answer.get("node_errors", {}).items():  # what the frontend's error dialog lists
        if entry["class_type"].startswith("Troupe"):
            assert len(entry["errors"]) == 1, (node_id, entry["errors"])
