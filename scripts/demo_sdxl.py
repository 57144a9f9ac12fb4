"""The SDXL part of `make demo`: example_workflows/sdxl_multi_subject.json run end to end on the tiny test models.

No real weights ship with the pack, so the graph's loaders are swapped for the test-only tiny models
(tests/custom_nodes/troupe_test_nodes) and a tiny MS-Diffusion-layout adapter is synthesised into the demo
server's models/troupe; every Troupe node of the graph runs unchanged. The pixels are noise.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "example_workflows" / "sdxl_multi_subject.json"
ADAPTER = "demo_ms_adapter_tiny.bin"
PHRASE = 32  # tiny clip_l width = the synthesised grounding resampler's phrase width
SIZE = 128


def write_demo_adapter(models_dir: Path) -> str:
    """A scaled-down MS-Diffusion ``ms_adapter.bin`` (published key names, random weights) in models/troupe."""
    import conftest  # noqa: F401  (registers the pack as comfyui_troupe)
    from fixtures.sdxl_adapters import ms_diffusion_state_dict, write_adapter

    write_adapter(models_dir / "troupe" / ADAPTER, ms_diffusion_state_dict(0, phrase_dim=PHRASE), nested_bin=True)
    return ADAPTER


def on_tiny_models(prompt: dict, adapter: str = ADAPTER, steps: int = 4) -> dict:
    """The API prompt of the SDXL workflow with its loaders replaced by the tiny test models."""
    prompt = json.loads(json.dumps(prompt))
    swap: dict[tuple[str, int], list] = {}
    for nid, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            del prompt[nid]
            prompt[f"{nid}01"] = {"class_type": "TroupeTestTinySDXL", "inputs": {"seed": 0}}
            prompt[f"{nid}02"] = {"class_type": "TroupeTestTinySDXLCLIP",
                                  "inputs": {"width_l": PHRASE, "width_g": 32, "seed": 0}}
            prompt[f"{nid}03"] = {"class_type": "TroupeTestTinyVAE", "inputs": {"kind": "sdxl", "seed": 0}}
            swap.update({(nid, 0): [f"{nid}01", 0], (nid, 1): [f"{nid}02", 0], (nid, 2): [f"{nid}03", 0]})
        elif kind == "CLIPVisionLoader":
            prompt[nid] = {"class_type": "TroupeTestTinyCLIPVision", "inputs": {"layers": 24, "seed": 0}}
        elif kind == "CLIPTextEncode":  # the tiny CLIP's text output does not fit the tiny UNet's 2048 context
            prompt[nid] = {"class_type": "TroupeTestConditioning", "inputs": {
                "seed": int(nid), "kind": "sdxl", "batch": 1, "width": SIZE, "height": SIZE, "tokens": 77,
                "guidance": 3.5}}
        elif kind == "TroupeLoadAdapter":
            inputs["adapter_name"] = adapter
        elif kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE)
        elif kind == "KSampler":
            inputs["steps"] = steps
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and (str(value[0]), value[1]) in swap:
                node["inputs"][name] = swap[(str(value[0]), value[1])]
    return prompt


def run(server, info: dict) -> list[Path]:
    """Run the SDXL graph on the tiny models in a started demo server; the written image paths."""
    from workflow_api import ui_to_api

    prompt = on_tiny_models(ui_to_api(json.loads(WORKFLOW.read_text()), info))
    print(f"[demo] running {WORKFLOW.relative_to(ROOT)} on the TINY TEST MODELS ({len(prompt)} nodes): "
          "TroupeTestTinySDXL / TroupeTestTinySDXLCLIP / TroupeTestTinyCLIPVision / TroupeTestTinyVAE and a "
          f"synthesised tiny MS-Diffusion adapter ({ADAPTER}) ...", flush=True)
    entry = server.run(prompt)
    written = [path for _, _, path in server.written_images(entry)]
    for node_id, _image, path in server.written_images(entry):
        print(f"[demo] node {node_id} ({prompt[node_id]['class_type']}) wrote {path}")
    print("[demo] NOTE: this SDXL image is NOISE. No real weights ship with the pack: the UNet, CLIP, CLIP vision, "
          "VAE and adapter above are tiny random-weight stand-ins, so this run only shows that the graph "
          "(subjects -> layout -> encode -> TroupeApplySDXL -> KSampler) works end to end. Put real files in "
          "models/checkpoints, models/clip_vision and models/troupe (see the notes in the workflow) for real images.")
    return written
