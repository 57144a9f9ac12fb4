"""Turn a UI-format workflow (what the frontend saves: nodes + links) into API format (what /prompt takes).

The backend cannot do this itself (the browser's ``app.graphToPrompt()`` does), so the demo and the
workflow tests use this converter with the server's ``/object_info``: widget values are positional,
in the order of the node's widget inputs, with the extra values the frontend stores after some
widgets (``control_after_generate`` after seeds, the upload button after image combos).
"""
from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Node types the frontend keeps in the graph but never sends to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _input_specs(info: dict) -> list[tuple[str, Any, dict]]:
    order = info.get("input_order", {})
    specs = []
    for section in ("required", "optional"):
        items = info.get("input", {}).get(section, {})
        for name in order.get(section, list(items)):
            spec = items[name]
            specs.append((name, spec[0], spec[1] if len(spec) > 1 else {}))
    return specs


def _is_widget(kind: Any, options: dict) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES and not options.get("forceInput")


def _extra_values(kind: Any, options: dict) -> int:
    """How many values the frontend stores after this widget's own value."""
    if options.get("control_after_generate"):
        return 1
    if options.get("image_upload") or options.get("video_upload") or options.get("audio_upload"):
        return 1
    return 0


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt {id: {"class_type", "inputs"}} of a UI-format workflow."""
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        if ntype not in object_info:
            raise KeyError(f"node {node['id']} has type {ntype!r}, which the server does not know")
        info = object_info[ntype]
        linked = {}
        for inp in node.get("inputs", []) or []:
            if inp.get("link") is not None:
                link = links[inp["link"]]
                linked[inp["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values", []) or [])
        if isinstance(node.get("widgets_values"), dict):
            values = []
        inputs: dict[str, Any] = {}
        pos = 0
        for name, kind, options in _input_specs(info):
            if _is_widget(kind, options) and pos < len(values):
                value = values[pos]
                pos += 1 + _extra_values(kind, options)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                inputs[name] = linked[name]
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt
