"""Issue 14's bad-input table in the real ComfyUI server: every Troupe node refuses each bad value clearly.

One parametrised test, one case per row of ``CASES``: a small valid graph (SDXL, FLUX adapter or FLUX reference
branch, tiny models, one step) with one value made bad. Each case must be refused

* naming the node and the input (ComfyUI's node_errors at queue time, or the execution error's text),
* at queue time when the value alone decides (``QUEUE``), else when the node runs (``RUN``) as the pack's own
  ``ValueError``/``TypeError`` whose text starts with the node's name, never a library exception,
* without running code from a file (the pickles would create ``MARKER``),

and the next valid prompt of that graph must then run. Legitimate extremes (1x1 and 6000x4000 references,
sub-pixel boxes, 8 subjects, RGBA) run to a finite image in ``test_legitimate_extremes_run``.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
from comfy_server import PromptError
from fixtures.troupe_graphs import GRAPHS, SIZE, TWO_BOXES, prepare, tensor
from PIL import Image

QUEUE, RUN = "queue", "run"
# a value outside a combo's options: ComfyUI 0.33 refuses it at queue time itself; 0.3.75 does not check V3 combo
# options, so the node refuses it as it starts. Either way the message names the input.
COMBO = "queue (ComfyUI's own combo check) or run (the node's)"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def server(comfy_server):
    return prepare(comfy_server)


# --------------------------------------------------------------------------- mutations


def setv(node: str, **values) -> Callable[[dict], None]:
    def mutate(p: dict) -> None:
        p[node]["inputs"].update(values)
    return mutate


def boxes(value) -> Callable[[dict], None]:
    return setv("lay", boxes=value if isinstance(value, str) else json.dumps(value))


def one_box(p: dict) -> None:
    p["lay"]["inputs"]["boxes"] = json.dumps({"version": 1, "boxes": TWO_BOXES["boxes"][:1]})
    del p["lay"]["inputs"]["subjects"]  # the layout itself does not know the subjects: the Apply node must catch it


def third_subject(target: str) -> Callable[[dict], None]:
    """A three-subject list into ``target``'s subjects input while the features hold two."""
    def mutate(p: dict) -> None:
        p["img2"] = tensor(3)
        p["s2"] = {"class_type": "TroupeSubject", "inputs": {"image": ["img2", 0], "label": "bird", "weight": 1.0}}
        p["list3"] = {"class_type": "TroupeSubjectList", "inputs": {"subject_1": ["s0", 0], "subject_2": ["s1", 0],
                                                                    "subject_3": ["s2", 0]}}
        p[target]["inputs"]["subjects"] = ["list3", 0]
    return mutate


def swap_model(kind: str) -> Callable[[dict], None]:
    def mutate(p: dict) -> None:
        p["model"] = ({"class_type": "TroupeTestTinyFLUX", "inputs": {"schnell": False, "seed": 0}} if kind == "flux"
                      else {"class_type": "TroupeTestTinySDXL", "inputs": {"seed": 0}})
    return mutate


def masked(mask: dict) -> Callable[[dict], None]:
    def mutate(p: dict) -> None:
        p["mask0"] = mask
        p["s0"]["inputs"]["mask"] = ["mask0", 1]
    return mutate


def granularity(**weights) -> Callable[[dict], None]:
    def mutate(p: dict) -> None:
        p["gran"] = {"class_type": "TroupeGranularity", "inputs": dict(
            {"features": ["enc", 0], "w_low": 1.0, "w_mid": 1.0, "w_high": 1.0, "subject": 0}, **weights)}
        p["apply"]["inputs"]["features"] = ["gran", 0]
    return mutate


def fusion(name: str) -> Callable[[dict], None]:
    def mutate(p: dict) -> None:
        p["fus"] = {"class_type": "TroupeLoadFusion", "inputs": {"fusion_name": name}}
        p["enc"]["inputs"]["fusion"] = ["fus", 0]
    return mutate


def combine(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(p: dict) -> None:
        for m in mutations:
            m(p)
    return mutate


@dataclass(frozen=True)
class Case:
    id: str
    graph: str
    mutate: Callable[[dict], None]
    stage: str
    node: str
    input: str
    says: tuple[str, ...] = field(default_factory=tuple)  # further words the message must hold (what to do)


S, F, R = "TroupeApplySDXL", "TroupeApplyFLUX", "TroupeReferenceBranch"
SUBJ, LAY, ENC = "TroupeSubject", "TroupeLayout", "TroupeEncodeSubjects"
LOAD, FUS, GRAN = "TroupeLoadAdapter", "TroupeLoadFusion", "TroupeGranularity"

CASES = [
    # TroupeApplySDXL: ranges, NaN, inf (issue items 2-4), combos, wiring (item 8)
    Case("sdxl-weight-negative", "sdxl", setv("apply", weight=-1.0), QUEUE, S, "weight"),
    Case("sdxl-weight-1e6", "sdxl", setv("apply", weight=1e6), QUEUE, S, "weight"),
    Case("sdxl-weight-nan", "sdxl", setv("apply", weight=NAN), QUEUE, S, "weight", ("finite",)),
    Case("sdxl-weight-inf", "sdxl", setv("apply", weight=INF), QUEUE, S, "weight"),
    Case("sdxl-weight-minus-inf", "sdxl", setv("apply", weight=-INF), QUEUE, S, "weight"),
    Case("sdxl-start-minus-3", "sdxl", setv("apply", start_percent=-3.0), QUEUE, S, "start_percent"),
    Case("sdxl-end-7", "sdxl", setv("apply", end_percent=7.0), QUEUE, S, "end_percent"),
    Case("sdxl-start-nan", "sdxl", setv("apply", start_percent=NAN), QUEUE, S, "start_percent", ("finite",)),
    Case("sdxl-end-nan", "sdxl", setv("apply", end_percent=NAN), QUEUE, S, "end_percent"),
    Case("sdxl-end-before-start", "sdxl", setv("apply", start_percent=0.8, end_percent=0.2), QUEUE, S,
         "end_percent", ("end >= start",)),
    Case("sdxl-blocks-unknown", "sdxl", setv("apply", blocks="sideways"), QUEUE, S, "blocks", ("expected one of",)),
    Case("sdxl-routing-unknown", "sdxl", setv("apply", routing="random"), QUEUE, S, "routing"),
    Case("sdxl-subject-weights-unknown", "sdxl", setv("apply", subject_weights="louder"), QUEUE, S,
         "subject_weights"),
    Case("sdxl-manual-without-schedule", "sdxl", setv("apply", routing="manual", schedule=""), RUN, S, "schedule"),
    Case("sdxl-manual-bad-schedule", "sdxl", setv("apply", routing="manual", schedule="soon: please"), RUN, S,
         "schedule"),
    Case("sdxl-layer-weights-garbage", "sdxl", setv("apply", layer_weights="x:y"), RUN, S, "layer_weights"),
    Case("sdxl-flux-model", "sdxl", swap_model("flux"), RUN, S, "model", ("TroupeApplyFLUX",)),
    Case("sdxl-flux-adapter", "sdxl", setv("ad", adapter_name="bad_flux.safetensors"), RUN, S, "adapter"),
    Case("sdxl-encoder-width", "sdxl", setv("ad", adapter_name="bad_ms_width32.safetensors"), RUN, S, "features",
         ("width 32",)),
    Case("sdxl-one-box-two-subjects", "sdxl", one_box, RUN, S, "layout", ("one box per subject",)),
    Case("sdxl-three-subjects-two-encoded", "sdxl", third_subject("apply"), RUN, S, "subjects"),
    Case("sdxl-no-clip-for-phrases", "sdxl", lambda p: p["apply"]["inputs"].pop("clip"), RUN, S, "clip"),
    # TroupeApplyFLUX
    Case("flux-weight-100", "flux", setv("apply", weight=100.0), QUEUE, F, "weight"),
    Case("flux-weight-negative", "flux", setv("apply", weight=-1.0), QUEUE, F, "weight"),
    Case("flux-weight-nan", "flux", setv("apply", weight=NAN), QUEUE, F, "weight", ("finite",)),
    Case("flux-weight-inf", "flux", setv("apply", weight=INF), QUEUE, F, "weight"),
    Case("flux-start-nan", "flux", setv("apply", start_percent=NAN), QUEUE, F, "start_percent"),
    Case("flux-start-minus-3", "flux", setv("apply", start_percent=-3.0), QUEUE, F, "start_percent"),
    Case("flux-end-7", "flux", setv("apply", end_percent=7.0), QUEUE, F, "end_percent"),
    Case("flux-end-inf", "flux", setv("apply", end_percent=INF), QUEUE, F, "end_percent"),
    Case("flux-end-before-start", "flux", setv("apply", start_percent=0.9, end_percent=0.1), QUEUE, F,
         "end_percent"),
    Case("flux-branches-unknown", "flux", setv("apply", branches="all of them"), QUEUE, F, "branches"),
    Case("flux-sdxl-adapter", "flux", setv("ad", adapter_name="bad_ms.bin"), RUN, F, "adapter"),
    Case("flux-sdxl-model", "flux", swap_model("sdxl"), RUN, F, "model"),
    Case("flux-encoder-width", "flux", setv("ad", adapter_name="bad_flux_w48.safetensors"), RUN, F, "features",
         ("width 48",)),
    Case("flux-one-box-two-subjects", "flux", one_box, RUN, F, "layout"),
    Case("flux-three-subjects-two-encoded", "flux", third_subject("apply"), RUN, F, "subjects"),
    # TroupeReferenceBranch
    # the reference branch declares only lora_name in validate_inputs (ComfyUI repeats a failed check once per declared
    # input, docs/queue-errors.md): NaN, a hand-edited attention mode and a missing DEM file are refused as it starts
    Case("ref-timestep-nan", "ref", setv("branch", reference_timestep=NAN), RUN, R, "reference_timestep"),
    Case("ref-timestep-negative", "ref", setv("branch", reference_timestep=-1.0), QUEUE, R, "reference_timestep"),
    Case("ref-timestep-2", "ref", setv("branch", reference_timestep=2.0), QUEUE, R, "reference_timestep"),
    Case("ref-guidance-inf", "ref", setv("branch", reference_guidance=INF), QUEUE, R, "reference_guidance"),
    Case("ref-guidance-1e6", "ref", setv("branch", reference_guidance=1e6), QUEUE, R, "reference_guidance"),
    Case("ref-lora-strength-nan", "ref", setv("branch", lora_strength=NAN), RUN, R, "lora_strength"),
    Case("ref-lora-strength-5", "ref", setv("branch", lora_strength=5.0), QUEUE, R, "lora_strength"),
    Case("ref-size-8", "ref", setv("branch", reference_size=8), QUEUE, R, "reference_size"),
    Case("ref-size-huge", "ref", setv("branch", reference_size=100000), QUEUE, R, "reference_size"),
    Case("ref-attention-unknown", "ref", setv("branch", reference_attention="all"), COMBO, R, "reference_attention"),
    Case("ref-lora-missing", "ref", setv("branch", lora_name="nowhere.safetensors"), QUEUE, R, "lora_name",
         ("models/troupe",)),
    Case("ref-dem-missing", "ref", setv("branch", dem_name="nowhere.safetensors"), COMBO, R, "dem_name"),
    Case("ref-lora-truncated", "ref", setv("branch", lora_name="bad_truncated.safetensors"), RUN, R, "lora_name"),
    Case("ref-lora-text", "ref", setv("branch", lora_name="bad_text.bin"), RUN, R, "lora_name"),
    Case("ref-lora-pickle", "ref", setv("branch", lora_name="bad_pickle.bin"), RUN, R, "lora_name"),
    Case("ref-dem-truncated", "ref", setv("branch", dem_name="bad_truncated.safetensors"), RUN, R, "dem_name"),
    Case("ref-dem-pickle", "ref", setv("branch", dem_name="bad_pickle.pt"), RUN, R, "dem_name"),
    Case("ref-sdxl-model", "ref", swap_model("sdxl"), RUN, R, "model"),
    Case("ref-label-not-in-prompt", "ref", setv("branch", prompt="a bicycle on a road"), RUN, R, "prompt"),
    Case("ref-one-box-two-subjects", "ref", one_box, RUN, R, "layout"),
    # TroupeSubject: channels, NaN / inf pixels, masks, label, weight
    Case("subject-grayscale", "sdxl", setv("img0", channels=1), RUN, SUBJ, "image", ("RGB",)),
    Case("subject-two-channels", "sdxl", setv("img0", channels=2), RUN, SUBJ, "image"),
    Case("subject-five-channels", "sdxl", setv("img0", channels=5), RUN, SUBJ, "image"),
    Case("subject-image-nan", "sdxl", setv("img0", fill="nan"), RUN, SUBJ, "image", ("NaN",)),
    Case("subject-image-inf", "sdxl", setv("img0", fill="inf"), RUN, SUBJ, "image"),
    Case("subject-image-nan-flux", "flux", setv("img1", fill="nan"), RUN, SUBJ, "image"),
    Case("subject-image-nan-ref", "ref", setv("img1", fill="nan"), RUN, SUBJ, "image"),
    Case("subject-label-empty", "sdxl", setv("s0", label="  "), RUN, SUBJ, "label"),
    Case("subject-label-201", "sdxl", setv("s0", label="dog" * 67), RUN, SUBJ, "label", ("at most 200",)),
    Case("subject-weight-nan", "sdxl", setv("s0", weight=NAN), QUEUE, SUBJ, "weight", ("finite",)),
    Case("subject-weight-negative", "sdxl", setv("s0", weight=-1.0), QUEUE, SUBJ, "weight"),
    Case("subject-weight-inf", "sdxl", setv("s0", weight=INF), QUEUE, SUBJ, "weight"),
    Case("subject-mask-wrong-size", "sdxl", masked(tensor(9, width=32, height=48)), RUN, SUBJ, "mask",
         ("resize",)),
    Case("subject-mask-nan", "sdxl", masked(tensor(9, fill="nan")), RUN, SUBJ, "mask"),
    Case("subject-mask-inf", "sdxl", masked(tensor(9, fill="inf")), RUN, SUBJ, "mask"),
    Case("subject-mask-batch-mismatch", "sdxl",
         combine(setv("img0", batch=2), masked(tensor(9, batch=3))), RUN, SUBJ, "mask"),
    Case("subject-list-empty", "sdxl", lambda p: p["list"]["inputs"].clear(), QUEUE, "TroupeSubjectList",
         "subject_1"),
    # TroupeLayout
    Case("layout-nested-json", "sdxl", boxes("[" * 5000 + "]" * 5000), QUEUE, LAY, "boxes"),
    Case("layout-not-json", "sdxl", boxes("{"), QUEUE, LAY, "boxes"),
    Case("layout-x0-after-x1", "sdxl", boxes({"version": 1, "boxes": [{"x0": 0.6, "y0": 0, "x1": 0.2, "y1": 1},
                                                                      TWO_BOXES["boxes"][1]]}), QUEUE, LAY, "boxes"),
    Case("layout-edge-outside", "sdxl", boxes({"version": 1, "boxes": [{"x0": 0, "y0": 0, "x1": 2, "y1": 1},
                                                                       TWO_BOXES["boxes"][1]]}), QUEUE, LAY, "boxes"),
    Case("layout-edge-nan", "sdxl", boxes('{"version": 1, "boxes": [{"x0": NaN, "y0": 0, "x1": 0.5, "y1": 1}, '
                                          '{"x0": 0.5, "y0": 0, "x1": 1, "y1": 1}]}'), QUEUE, LAY, "boxes"),
    Case("layout-width-10", "sdxl", setv("lay", width=10), QUEUE, LAY, "width"),
    Case("layout-height-huge", "sdxl", setv("lay", height=100000), QUEUE, LAY, "height"),
    Case("layout-three-boxes-two-subjects", "sdxl",
         boxes({"version": 1, "boxes": TWO_BOXES["boxes"] + [{"x0": 0, "y0": 0, "x1": 1, "y1": 1}]}), RUN, LAY,
         "boxes"),
    # TroupeEncodeSubjects, TroupeGranularity
    Case("encode-layers-words", "sdxl", setv("enc", layers="deep, deeper"), RUN, ENC, "layers"),
    Case("encode-layers-out-of-range", "sdxl", setv("enc", layers="10,17,99"), RUN, ENC, "layers"),
    Case("encode-crop-unknown", "sdxl", setv("enc", crop="diagonal"), QUEUE, ENC, "crop"),
    Case("granularity-nan", "sdxl", granularity(w_low=NAN), QUEUE, GRAN, "w_low"),
    Case("granularity-inf", "sdxl", granularity(w_high=INF), QUEUE, GRAN, "w_high"),
    Case("granularity-all-zero", "sdxl", granularity(w_low=0.0, w_mid=0.0, w_high=0.0), QUEUE, GRAN, "w_low"),
    # TroupeLoadAdapter, TroupeLoadFusion: missing, truncated, not tensors, pickles that would run code
    Case("adapter-missing", "sdxl", setv("ad", adapter_name="nowhere.safetensors"), QUEUE, LOAD, "adapter_name"),
    Case("adapter-truncated", "sdxl", setv("ad", adapter_name="bad_truncated.safetensors"), RUN, LOAD,
         "adapter_name", ("bad_truncated.safetensors",)),
    Case("adapter-text", "sdxl", setv("ad", adapter_name="bad_text.bin"), RUN, LOAD, "adapter_name"),
    Case("adapter-json", "sdxl", setv("ad", adapter_name="bad_json.safetensors"), RUN, LOAD, "adapter_name"),
    Case("adapter-pickle-bin", "sdxl", setv("ad", adapter_name="bad_pickle.bin"), RUN, LOAD, "adapter_name",
         ("safety",)),
    Case("adapter-pickle-pt", "flux", setv("ad", adapter_name="bad_pickle.pt"), RUN, LOAD, "adapter_name"),
    Case("fusion-missing", "sdxl", fusion("nowhere.safetensors"), QUEUE, FUS, "fusion_name"),
    Case("fusion-truncated", "flux", fusion("bad_truncated.safetensors"), RUN, FUS, "fusion_name"),
    Case("fusion-pickle", "flux", fusion("bad_pickle.bin"), RUN, FUS, "fusion_name"),
    Case("fusion-text", "flux", fusion("bad_text.bin"), RUN, FUS, "fusion_name"),
]


def refusal(server, prompt: dict) -> tuple[str, str, dict]:
    """(stage, the text a user sees, the payload) of a prompt that must be refused.

    Posted as JSON with NaN and Infinity literals (what a hand-edited or scripted workflow can send; Python's
    JSON reader in the server accepts them). A prompt whose output is refused while another output node (the
    adapter loader shows a preview) is valid is still queued for that node: node_errors name the refusal.
    """
    body = json.dumps({"prompt": prompt, "client_id": "bad-inputs"})  # allow_nan: NaN / Infinity literals
    r = requests.post(f"{server.url}/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    answer = r.json()
    if answer.get("node_errors") or r.status_code != 200:
        if r.status_code == 200:  # the valid output nodes run: let them finish before the next prompt
            with contextlib.suppress(PromptError):
                server.wait(answer["prompt_id"])
        return QUEUE, json.dumps(answer), answer
    try:
        server.wait(answer["prompt_id"])
    except PromptError as e:
        msgs = [m[1] for m in e.payload["status"]["messages"] if m[0] == "execution_error"]
        return RUN, json.dumps(msgs), msgs[0]
    raise AssertionError("the prompt ran; it should have been refused")


def valid_run(server, graph: str, seed: int) -> np.ndarray:
    entry = server.run(GRAPHS[graph](seed))
    images = entry["outputs"]["out"]["images"]
    return np.asarray(Image.open(server.image_path(images[0])), dtype=np.float32)


def test_the_table_covers_every_troupe_input_node_and_has_80_cases():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)
    assert {c.node for c in CASES} >= {S, F, R, SUBJ, LAY, ENC, LOAD, FUS, GRAN, "TroupeSubjectList"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_clearly_and_the_next_prompt_runs(server, case: Case):
    prompt = GRAPHS[case.graph](0)
    case.mutate(prompt)
    stage, text, payload = refusal(server, copy.deepcopy(prompt))
    expected = (QUEUE, RUN) if case.stage == COMBO else (case.stage,)
    assert stage in expected, f"refused at {stage}, expected at {case.stage}: {text[:1500]}"
    if stage == QUEUE:
        errors = payload.get("node_errors", {})
        hits = [e for e in errors.values() if e["class_type"] == case.node]
        assert hits, f"no error on {case.node}: {text[:1500]}"
        details = " ".join(f"{x['message']} {x['details']}" for e in hits for x in e["errors"])
        assert case.input in details, details
    else:
        assert payload["node_type"] == case.node, text[:1500]
        assert payload["exception_type"] in ("ValueError", "TypeError"), \
            f"a raw {payload['exception_type']}: {payload['exception_message']}"
        message = payload["exception_message"]
        assert message.startswith(f"{case.node}:") and case.input in message, message
    for word in case.says:
        assert word in text, text[:1500]
    assert not server.marker.exists(), "a pickle ran code"
    image = valid_run(server, case.graph, seed=1 + CASES.index(case))
    assert np.isfinite(image).all() and image.shape == (SIZE, SIZE, 3)


def _extreme(mutation: Callable[[dict], None], graph: str = "sdxl") -> Callable[[int], dict]:
    def build(seed: int) -> dict:
        p = GRAPHS[graph](seed)
        mutation(p)
        return p
    return build


def eight_subjects(p: dict) -> None:
    labels = ["dog", "cat", "bird", "fish", "cup", "hat", "shoe", "lamp"]
    for i, label in enumerate(labels):
        p[f"img{i}"] = tensor(i + 1)
        p[f"s{i}"] = {"class_type": "TroupeSubject", "inputs": {"image": [f"img{i}", 0], "label": label,
                                                                "weight": 1.0}}
    p["list"]["inputs"] = {f"subject_{i + 1}": [f"s{i}", 0] for i in range(8)}
    p["lay"]["inputs"]["boxes"] = json.dumps({"version": 1, "boxes": [
        {"x0": (i % 4) / 4, "y0": (i // 4) / 2, "x1": (i % 4 + 1) / 4, "y1": (i // 4 + 1) / 2, "label": label}
        for i, label in enumerate(labels)]})
    if "branch" in p:
        p["branch"]["inputs"]["prompt"] = " and ".join(labels)


EXTREMES = {
    "reference-1x1": setv("img0", width=1, height=1),
    "reference-6000x4000": setv("img0", width=6000, height=4000),
    "reference-rgba": setv("img0", channels=4),
    "reference-batch-of-views": setv("img1", batch=3),
    "sub-pixel-boxes": boxes({"version": 1, "boxes": [{"x0": 0.1, "y0": 0.1, "x1": 0.1001, "y1": 0.1001},
                                                      {"x0": 0.51, "y0": 0.51, "x1": 0.5101, "y1": 0.5102}]}),
    "eight-subjects": eight_subjects,
}


@pytest.mark.parametrize("graph", ["sdxl", "flux", "ref"])
@pytest.mark.parametrize("name", list(EXTREMES))
def test_legitimate_extremes_run(server, name: str, graph: str):
    """Legitimate extremes run to a finite image (none is refused on any of the three graphs)."""
    entry = server.run(_extreme(EXTREMES[name], graph)(0))
    image = np.asarray(Image.open(server.image_path(entry["outputs"]["out"]["images"][0])), dtype=np.float32)
    assert np.isfinite(image).all() and image.shape == (SIZE, SIZE, 3)


def test_a_layout_drawn_for_another_aspect_warns_in_the_log(server):
    """An SDXL-shaped square layout sampled on a wide FLUX latent runs, and the log says the boxes stretch."""
    p = GRAPHS["flux"](0)
    p["lat"]["inputs"].update(width=128, height=64)
    before = len(server.log())
    server.run(p)
    assert "the boxes are stretched to fit" in server.log()[before:]
