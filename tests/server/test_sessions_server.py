"""Isolation, interrupts and a long session in the real ComfyUI server (issue 14, items 3-5), on the tiny models.

Re-running a sampler without changing its numbers: ComfyUI caches a node by its inputs, so the same KSampler
would not run again. ``KSamplerAdvanced`` (noise on, steps 0 to 10000, no leftover noise) computes exactly what
``KSampler`` (denoise 1) computes, and is a different node: it runs on the cached (possibly leaked-into) model.
"""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import requests
import websocket
from comfy_server import PromptError
from fixtures.troupe_graphs import GRAPHS, TWO_BOXES, prepare, subjects_part
from PIL import Image

OTHER = {"sdxl": ("apply", {"weight": 0.3, "blocks": "down"}), "flux": ("apply", {"weight": 0.4}),
         "ref": ("branch", {"reference_attention": "self_cached", "selective_text": False})}


@pytest.fixture(scope="module")
def server(comfy_server):
    return prepare(comfy_server)


def advanced(p: dict) -> dict:
    """The graph with its KSampler swapped for the equivalent KSamplerAdvanced."""
    k = p["ks"]["inputs"]
    p["ks"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": k["model"], "add_noise": "enable", "noise_seed": k["seed"], "steps": k["steps"], "cfg": k["cfg"],
        "sampler_name": k["sampler_name"], "scheduler": k["scheduler"], "positive": k["positive"],
        "negative": k["negative"], "latent_image": k["latent_image"], "start_at_step": 0, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    return p


def base(p: dict) -> dict:
    p["ks"]["inputs"]["model"] = ["model", 0]
    return p


def image(server, entry: dict, node: str = "out") -> np.ndarray:
    return np.asarray(Image.open(server.image_path(entry["outputs"][node]["images"][0])), dtype=np.int16)


def inspect_model(server, graph: str) -> dict:
    p = GRAPHS[graph](0)
    p = {"model": p["model"], "look": {"class_type": "TroupeTestInspect", "inputs": {"value": ["model", 0]}}}
    entry = server.run(p)
    return json.loads(entry["outputs"]["look"]["text"][0])


# --------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("graph", ["sdxl", "flux", "ref"])
def test_base_patched_other_patch_base_is_bit_identical(server, graph):
    build = GRAPHS[graph]
    first = image(server, server.run(base(build(11))))
    patched = image(server, server.run(build(11)))
    node, values = OTHER[graph]
    other = build(11)
    other[node]["inputs"].update(values)
    other_image = image(server, server.run(other))
    again = image(server, server.run(advanced(base(build(11)))))  # runs on the cached base model object
    assert np.abs(patched - first).max() > 0 and np.abs(other_image - patched).max() > 0
    assert np.array_equal(again, first)
    assert not any(inspect_model(server, graph)["patches_replace"].values())


def test_two_apply_nodes_from_one_adapter_are_independent(server):
    """Two TroupeApplySDXL from one loader in one prompt: each image equals that Apply node's image alone."""
    p = GRAPHS["sdxl"](12)
    p["apply2"] = {"class_type": "TroupeApplySDXL", "inputs": dict(p["apply"]["inputs"], weight=0.2, blocks="up")}
    p["ks2"] = {"class_type": "KSampler", "inputs": dict(p["ks"]["inputs"], model=["apply2", 0])}
    p["dec2"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ks2", 0], "vae": ["vae", 0]}}
    p["out2"] = {"class_type": "SaveImage", "inputs": {"images": ["dec2", 0], "filename_prefix": "two_apply"}}
    entry = server.run(p)
    one, two = image(server, entry, "out"), image(server, entry, "out2")
    assert np.abs(one - two).max() > 0
    alone = GRAPHS["sdxl"](12)
    alone["apply"]["inputs"].update(weight=0.2, blocks="up")
    alone["apply"]["inputs"]["schedule"] = " "  # a new Apply node (not the cached one), same behaviour
    assert np.array_equal(image(server, server.run(advanced(alone))), two)
    first = GRAPHS["sdxl"](12)
    first["apply"]["inputs"]["schedule"] = " "
    assert np.array_equal(image(server, server.run(advanced(first))), one)


def resized(p: dict, width: int, height: int) -> dict:
    p["lat"]["inputs"].update(width=width, height=height)
    for c in ("pos", "neg"):
        p[c]["inputs"].update(width=width, height=height)
    p["lay"]["inputs"].update(width=width, height=height)
    return p


@pytest.mark.parametrize("graph", ["sdxl", "flux", "ref"])
def test_cached_patch_nodes_never_reuse_stale_run_state(server, graph):
    """The Apply node cached, only the sampler re-run at a new resolution (and after a three-subject prompt):
    the image equals a run where the Apply node is built fresh for that resolution."""
    build = GRAPHS[graph]
    server.run(build(13))  # 64 x 64: the Apply node and its run state at this size
    p = build(13)
    p["lat"]["inputs"].update(width=96, height=64)  # only the sampler (and decode) run again
    for c in ("pos", "neg"):
        p[c]["inputs"].update(width=96, height=64)
    cached = image(server, server.run(p))
    fresh = resized(build(13), 96, 64)  # the layout drawn at 96 x 64: a new layout, a new Apply node
    assert np.array_equal(image(server, server.run(fresh)), cached)
    # three subjects, then the two-subject prompt again on the cached two-subject Apply node
    three = build(14)
    three.update(subjects_part(("dog", "cat", "bird")))
    three["lay"]["inputs"]["boxes"] = json.dumps({"version": 1, "boxes": TWO_BOXES["boxes"] + [
        {"x0": 0.25, "y0": 0.25, "x1": 0.75, "y1": 0.75, "label": "bird"}]})
    if graph == "ref":
        three["branch"]["inputs"]["prompt"] = "a dog, a cat and a bird"
    server.run(three)
    before = image(server, server.run(build(14)))
    assert np.array_equal(image(server, server.run(advanced(build(14)))), before)


# --------------------------------------------------------------------------- interrupt


def run_interrupted(server, prompt: dict, when: str, steps: int) -> bool:
    """Queue ``prompt`` and POST /interrupt at ``when`` (the sampler node starting = its first-call setup, the
    first step, the middle step), watching the websocket; True when the run was interrupted."""
    client = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client}", timeout=120)
    try:
        r = requests.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client}, timeout=60)
        prompt_id = r.json()["prompt_id"]
        target = {"setup": None, "first": 1, "middle": steps // 2}[when]
        while True:
            raw = ws.recv()
            if not isinstance(raw, str):
                continue
            msg = json.loads(raw)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if msg["type"] == "executing" and data.get("node") == "ks" and target is None:
                break
            if msg["type"] == "progress" and target is not None and data.get("value", 0) >= target:
                break
            if msg["type"] in ("execution_success", "execution_error"):
                return False
        requests.post(f"{server.url}/interrupt", timeout=60)
    finally:
        ws.close()
    try:
        server.wait(prompt_id)
    except PromptError:
        return True
    return False


@pytest.mark.parametrize("when", ["setup", "first", "middle"])
def test_an_interrupted_run_leaves_nothing_behind(server, when):
    steps = 24
    seed = 20 + ["setup", "first", "middle"].index(when)

    def graph() -> dict:
        p = GRAPHS["sdxl"](seed)
        p["ks"]["inputs"]["steps"] = steps
        return p

    reference = image(server, server.run(advanced(graph())))
    assert run_interrupted(server, graph(), when, steps), "the run finished before the interrupt"
    after = image(server, server.run(graph()))
    assert np.array_equal(after, reference)
    assert not any(inspect_model(server, "sdxl")["patches_replace"].values())


# --------------------------------------------------------------------------- long session


RSS_GROWTH_BOUND = 256 * 2**20  # bytes between prompt 10 and prompt 30 of the same cycle of graphs


def held(server, nonce: int) -> dict:
    """The pack's live objects and the RSS, with one TroupeLayout output kept alive (the count must see it)."""
    p = subjects_part()
    p["held"] = {"class_type": "TroupeTestHeld", "inputs": {"nonce": nonce, "value": ["lay", 0]}}
    entry = server.run(p)
    return json.loads(entry["outputs"]["held"]["text"][0])


def test_a_long_session_holds_no_growing_state(server):
    """30 prompts cycling subjects (2, 3), layouts, resolutions (64 to 96 px) and adapters (MS-Diffusion on SDXL,
    the FLUX adapter, the reference branch): the pack's live objects at prompt 30 are those at prompt 10 (the
    same graph each time), and resident memory grows less than RSS_GROWTH_BOUND."""
    sizes = [(64, 64), (96, 64), (64, 96), (80, 80), (96, 96)]
    graphs = ["sdxl", "flux", "ref"]
    snapshots = {}
    for i in range(30):
        graph = graphs[i % 3]
        p = resized(GRAPHS[graph](100 + i % 10), *sizes[i % 5])
        if i % 2:
            p.update(subjects_part(("dog", "cat", "bird")))
            p = resized(p, *sizes[i % 5])
            p["lay"]["inputs"]["boxes"] = json.dumps({"version": 1, "boxes": TWO_BOXES["boxes"] + [
                {"x0": 0.1 * (i % 5), "y0": 0.2, "x1": 0.5 + 0.1 * (i % 5), "y1": 0.9, "label": "bird"}]})
            if graph == "ref":
                p["branch"]["inputs"]["prompt"] = "a dog, a cat and a bird"
        server.run(p)
        if i + 1 in (10, 30):
            snapshots[i + 1] = held(server, i)
    early, late = snapshots[10], snapshots[30]
    assert any(k.endswith(".Layout") for k in early["objects"]), early  # the count sees the pack's objects
    grown = {k: (early["objects"].get(k, 0), v) for k, v in late["objects"].items() if v > early["objects"].get(k, 0)}
    assert not grown, f"pack objects grew between prompt 10 and 30: {grown}"
    assert late["rss"] - early["rss"] < RSS_GROWTH_BOUND, (early["rss"], late["rss"])
