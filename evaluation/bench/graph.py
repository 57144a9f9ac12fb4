"""One run's API-format graph from the spec's workflow template.

The template is an ordinary graph (ComfyUI: Export (API)) with:
- one ``TroupeSubjectList``: its inputs are replaced by one LoadImage -> TroupeSubject per case subject;
- ``TroupeLayout`` node(s): ``boxes`` get the case's boxes, ``width``/``height`` the spec's canvas;
- exactly one ``TroupeFidelity``: its ``prompt`` is the case's prompt; a SaveImage of the image it scores is added;
- placeholders in string values: ``$prompt``, ``$seed``, ``$width``, ``$height`` as the whole value (typed), and
  ``$prompt``, ``$case``, ``$setting``, ``$seed`` inside longer strings (e.g. a filename prefix);
- then the setting's overrides ``"<node id>.<input>": value`` (a value may be a link ``["node id", output]``).
"""
from __future__ import annotations

import copy
import json

from .spec import Run, SpecError

SUBJECT_LIST, LAYOUT, FIDELITY, SUBJECT = "TroupeSubjectList", "TroupeLayout", "TroupeFidelity", "TroupeSubject"
SAVE_ID = "troupe_bench_save"


def nodes_of(graph: dict, class_type: str) -> list[str]:
    return [nid for nid, node in graph.items() if node.get("class_type") == class_type]


def check_template(graph: dict) -> None:
    """The nodes the runner fills in must be there (once for the subject list and the fidelity node)."""
    for cls in (SUBJECT_LIST, FIDELITY):
        found = nodes_of(graph, cls)
        if len(found) != 1:
            raise SpecError(f"workflow: needs exactly one {cls} node, found {len(found)}"
                            + (f" ({', '.join(found)})" if found else "") +
                            (f"; add {cls} wired to the generated image, the subject list and the layout"
                             if cls == FIDELITY else "; the runner connects each case's subjects to it"))
    if not nodes_of(graph, LAYOUT):
        raise SpecError("workflow: needs a TroupeLayout node; the runner writes each case's boxes into it")
    fid = graph[nodes_of(graph, FIDELITY)[0]]["inputs"]
    if not isinstance(fid.get("image"), list):
        raise SpecError("workflow: TroupeFidelity's 'image' must be linked to the generated image (e.g. VAEDecode)")


def substitute(value, run: Run, width: int, height: int):
    """Placeholders: typed when the whole value, text inside longer strings."""
    if not isinstance(value, str) or "$" not in value:
        return value
    whole = {"$prompt": run.case.prompt, "$seed": run.seed, "$width": width, "$height": height}
    if value in whole:
        return whole[value]
    for key, rep in (("$prompt", run.case.prompt), ("$case", run.case.id), ("$setting", run.setting),
                     ("$seed", str(run.seed))):
        value = value.replace(key, rep)
    return value


def layout_json(run: Run) -> str:
    """The box editor's JSON value (what TroupeLayout's ``boxes`` holds), labelled with the subjects."""
    boxes = [{"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "label": s.label}
             for b, s in zip(run.case.boxes, run.case.subjects)]
    return json.dumps({"version": 1, "boxes": boxes})


def build_graph(template: dict, run: Run, settings: dict, width: int, height: int,
                uploaded: dict[str, str]) -> tuple[dict, str, str]:
    """(graph, fidelity node id, save node id) for one run; ``uploaded`` maps each image path to its server name."""
    check_template(template)
    graph = copy.deepcopy(template)
    for node in graph.values():
        node["inputs"] = {k: substitute(v, run, width, height) for k, v in node.get("inputs", {}).items()}
    list_id = nodes_of(graph, SUBJECT_LIST)[0]
    graph[list_id]["inputs"] = {}
    for k, s in enumerate(run.case.subjects, start=1):
        load_id, subject_id = f"troupe_bench_load_{k}", f"troupe_bench_subject_{k}"
        graph[load_id] = {"class_type": "LoadImage", "inputs": {"image": uploaded[str(s.image)]}}
        graph[subject_id] = {"class_type": SUBJECT, "inputs": {"image": [load_id, 0], "label": s.label,
                                                               "weight": s.weight}}
        graph[list_id]["inputs"][f"subject_{k}"] = [subject_id, 0]
    for lid in nodes_of(graph, LAYOUT):
        graph[lid]["inputs"].update(boxes=layout_json(run), width=width, height=height)
    fid = nodes_of(graph, FIDELITY)[0]
    graph[fid]["inputs"]["prompt"] = run.case.prompt
    for target, value in settings[run.setting].items():
        node, _, inp = target.partition(".")
        graph[node]["inputs"][inp] = substitute(value, run, width, height)
    graph[SAVE_ID] = {"class_type": "SaveImage", "inputs": {"images": graph[fid]["inputs"]["image"],
                                                            "filename_prefix": "troupe_bench/" + run.slug}}
    return graph, fid, SAVE_ID
