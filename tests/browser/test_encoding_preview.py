"""The reference-encoding graph built and queued in the real frontend: the fusion-weight chart shows on its node."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image
from playwright import sync_api
from server.test_encoding_server import FUSION, write_fusion

WAIT_MS = 90_000  # an upper bound for polled waits (never slept): a loaded 2-core machine can take long


def test_fusion_weights_preview_shows_in_the_ui(page, comfy_server, msbench, artifacts):
    write_fusion(comfy_server.models_dir / "troupe" / FUSION, 64, seed=0)
    for key in ("dog", "cat"):
        shutil.copy(msbench / f"images/living/{key}.jpg", comfy_server.input_dir / f"ui_{key}.jpg")
    preview_id = page.evaluate("""async (fusion) => {
        await app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {},
                                 extra: {ds: {scale: 0.6, offset: [20, 20]}}, version: 0.4});
        const add = (type, x, y, values = {}) => {
            const n = LiteGraph.createNode(type);
            n.pos = [x, y];
            app.graph.add(n);
            for (const [k, v] of Object.entries(values)) n.widgets.find(w => w.name === k).value = v;
            return n;
        };
        const dog = add("LoadImage", 0, 0, {image: "ui_dog.jpg"});
        const cat = add("LoadImage", 0, 380, {image: "ui_cat.jpg"});
        const s1 = add("TroupeSubject", 330, 0, {label: "dog"});
        const s2 = add("TroupeSubject", 330, 380, {label: "cat"});
        const list = add("TroupeSubjectList", 640, 150);
        const clip = add("TroupeTestTinyCLIPVision", 640, 450);
        const fuse = add("TroupeLoadFusion", 640, 620, {fusion_name: fusion});
        const enc = add("TroupeEncodeSubjects", 960, 150);
        const gran = add("TroupeGranularity", 1260, 150, {w_low: 1.0, w_mid: 0.0, w_high: 0.0, subject: 2});
        const chart = add("TroupeFusionWeightsPreview", 1560, 150);
        chart.setSize([760, 360]);
        const link = (a, b, name) => {  // by input name: widget inputs also count as slots in this frontend
            const slot = b.inputs.findIndex(i => i.name === name);
            if (slot < 0 || !a.connect(0, b, slot)) throw new Error(`cannot link ${a.type} -> ${b.type}.${name}`);
        };
        link(dog, s1, "image"); link(cat, s2, "image");
        link(s1, list, "subject_1"); link(s2, list, "subject_2");
        link(clip, enc, "clip_vision"); link(list, enc, "subjects"); link(fuse, enc, "fusion");
        link(enc, gran, "features"); link(gran, chart, "features");
        app.graph.setDirtyCanvas(true, true);
        await app.queuePrompt(0);
        return chart.id;
    }""", FUSION)
    # The frontend puts the executed node's preview in node.imgs once the image has loaded from /view
    try:
        page.wait_for_function("""(id) => { const n = app.graph.getNodeById(id);
        app.graph.setDirtyCanvas(true, true);
        return n?.imgs?.length === 1 && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }""",
                               arg=preview_id, timeout=WAIT_MS, polling=250)
    except sync_api.TimeoutError:
        state = page.evaluate("""(id) => { const n = app.graph.getNodeById(id);
            return {imgs: n?.imgs?.map(i => [i.src, i.complete, i.naturalWidth]) ?? null,
                    outputs: app.nodeOutputs?.[String(id)] ?? null, links: app.graph.links?.size ?? null}; }""",
                              preview_id)
        history = list(comfy_server.get("/history").json().values())[-1:]
        pytest.fail(f"no preview on the node: {state}; last history entry: {str(history)[:3000]}")
    src = page.evaluate("(id) => app.graph.getNodeById(id).imgs[0].src", preview_id)
    assert "/view?" in src and "type=temp" in src
    shown = Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")
    arr = np.asarray(shown)
    assert arr.shape[1] > arr.shape[0] and arr.std() > 10
    page.screenshot(path=str(artifacts / "fusion_weights_preview_ui.png"))
    assert not page.troupe_errors, page.troupe_errors
