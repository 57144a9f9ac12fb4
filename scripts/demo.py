"""`make demo`: start ComfyUI with the pack, run example_workflows/layout_basics.json headless, print the outputs, stop.

Then the SDXL multi-subject graph (example_workflows/sdxl_multi_subject.json) runs end to end on the tiny test models
(scripts/demo_sdxl.py; the server loads the test-only nodes of tests/custom_nodes for them): its pixels are noise.

Run with the host's Python (.host/venv/bin/python scripts/demo.py [--workflow PATH] [--port N]).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the harness lives with the tests; this script is not part of the pack

import demo_sdxl
from comfy_server import ComfyServer
from workflow_api import ui_to_api


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workflow", type=Path, default=ROOT / "example_workflows" / "layout_basics.json")
    ap.add_argument("--port", type=int, default=0, help="port for the demo server (default: a free one)")
    ap.add_argument("--no-sdxl", action="store_true", help="skip the SDXL graph on the tiny test models")
    args = ap.parse_args()

    workdir = ROOT / ".host" / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    server = ComfyServer(port=args.port, with_test_nodes=not args.no_sdxl, workdir=workdir)
    server.input_dir.mkdir(parents=True, exist_ok=True)
    for image in (ROOT / "assets").glob("*.jpg"):
        shutil.copy(image, server.input_dir / image.name)
    if not args.no_sdxl:
        demo_sdxl.write_demo_adapter(server.models_dir)
    print(f"[demo] starting ComfyUI with ComfyUI-Troupe on {server.url} ...", flush=True)
    with server:
        info = server.object_info()
        troupe = sorted(k for k in info if k.startswith("Troupe") and not k.startswith("TroupeTest"))
        print(f"[demo] Troupe nodes loaded: {', '.join(troupe)}")
        prompt = ui_to_api(json.loads(args.workflow.read_text()), info)
        print(f"[demo] running {args.workflow.relative_to(ROOT)} ({len(prompt)} nodes) through /prompt ...", flush=True)
        entry = server.run(prompt)
        written = server.written_images(entry)
        for node_id, image, path in written:
            kind = image.get("type", "output")
            print(f"[demo] node {node_id} ({prompt[node_id]['class_type']}) wrote {kind} image {path}")
        if not written:
            print("[demo] the workflow ran but wrote no image", file=sys.stderr)
            return 1
        if not args.no_sdxl and not demo_sdxl.run(server, info):
            print("[demo] the SDXL graph ran but wrote no image", file=sys.stderr)
            return 1
    print(f"[demo] done; server stopped. Outputs are in {server.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
