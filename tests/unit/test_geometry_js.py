"""The box editor's pure geometry (web/js/troupe_geometry.js) run under Node: snapping, hits, drags, JSON."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GEOMETRY = ROOT / "web" / "js" / "troupe_geometry.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the editor's ES module")


def run_js(body: str):
    """Run `body` (which sets `out`) with the geometry module imported as G; return `out` as JSON."""
    script = f"import * as G from {json.dumps(GEOMETRY.as_uri())};\nlet out;\n{body}\nconsole.log(JSON.stringify(out));"
    res = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_palette_and_limits_match_python():
    from comfyui_troupe.models.layout.layout import MAX_REGIONS, PALETTE

    out = run_js("out = [G.PALETTE, G.MAX_BOXES];")
    assert out == [list(PALETTE), MAX_REGIONS]


def test_snap_uses_the_latent_grid_and_allows_the_canvas_edge():
    out = run_js("out = [G.snap(3, 512), G.snap(5, 512), G.snap(-20, 512), G.snap(600, 512), G.snap(99, 100), G.snap(95, 100)];")
    # 99 is nearer the edge (100) than the grid line 96; 95 is nearer 96
    assert out == [0, 8, 0, 512, 100, 96]


def test_draw_snaps_and_refuses_boxes_under_the_minimum_size():
    out = run_js("""
        const d = G.startDrag([], {index: -1, part: "none"}, 65, 71, 512, 512);
        const tiny = G.startDrag([], {index: -1, part: "none"}, 10, 10, 512, 512);
        out = [d.mode, G.applyDrag(d, 201, 303, 512, 512), G.applyDrag(tiny, 11, 40, 512, 512)];
    """)
    assert out[0] == "draw"
    assert out[1] == [{"x0": 64 / 512, "y0": 72 / 512, "x1": 200 / 512, "y1": 304 / 512, "label": ""}]
    assert out[2] == []  # x 10..11 snaps to 8..8: narrower than MIN_SIZE, so no box (a click draws nothing)


def test_hit_test_prefers_corners_then_the_topmost_body():
    out = run_js("""
        const px = [{x0: 0, y0: 0, x1: 100, y1: 100}, {x0: 50, y0: 50, x1: 150, y1: 150}];
        out = [G.hitTest(px, 98, 3, 6), G.hitTest(px, 75, 75, 6), G.hitTest(px, 75, 75, 6, 0),
               G.hitTest(px, 200, 200, 6), G.hitTest(px, 151, 149, 6)];
    """)
    assert out == [
        {"index": 0, "part": "ne"},
        {"index": 1, "part": "body"},  # the later box is on top
        {"index": 0, "part": "body"},  # unless the selected one is under the pointer
        {"index": -1, "part": "none"},
        {"index": 1, "part": "se"},
    ]


def test_move_keeps_size_and_stays_on_canvas_and_resize_keeps_the_minimum():
    out = run_js("""
        const boxes = [{x0: 0.125, y0: 0.125, x1: 0.375, y1: 0.5, label: "cat"}];
        const mv = G.startDrag(boxes, {index: 0, part: "body"}, 100, 100, 512, 512);
        const rs = G.startDrag(boxes, {index: 0, part: "se"}, 192, 256, 512, 512);
        out = [G.applyDrag(mv, 141, 139, 512, 512), G.applyDrag(mv, 900, 900, 512, 512),
               G.applyDrag(rs, 0, 0, 512, 512)];
    """)
    assert out[0] == [{"x0": 104 / 512, "y0": 104 / 512, "x1": 232 / 512, "y1": 296 / 512, "label": "cat"}]
    assert out[1] == [{"x0": 384 / 512, "y0": 320 / 512, "x1": 1.0, "y1": 1.0, "label": "cat"}]
    assert out[2] == [{"x0": 0.125, "y0": 0.125, "x1": 72 / 512, "y1": 72 / 512, "label": "cat"}]


def test_json_is_tolerant_and_round_trips():
    out = run_js("""
        const good = '{"version": 1, "boxes": [{"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9, "label": "dog"}, [0, 0, 0.5, 0.5]]}';
        out = [G.parseLayout("not json"), G.parseLayout('{"boxes": 3}'), G.parseLayout(""),
               G.parseLayout('{"boxes": [{"x0": 0.5, "y0": 0, "x1": 0.2, "y1": 1}]}'),
               G.serialiseLayout(G.parseLayout(good))];
    """)
    assert out[:4] == [[], [], [], []]
    assert json.loads(out[4]) == {"version": 1, "boxes": [
        {"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9, "label": "dog"}, {"x0": 0, "y0": 0, "x1": 0.5, "y1": 0.5}]}


def test_delete_and_reorder():
    out = run_js("""
        const b = [{x0: 0, y0: 0, x1: 0.1, y1: 0.1}, {x0: 0.2, y0: 0, x1: 0.3, y1: 0.1}, {x0: 0.4, y0: 0, x1: 0.5, y1: 0.1}];
        out = [G.deleteBox(b, 1).map(x => x.x0), G.reorderBox(b, 2, -1), G.reorderBox(b, 0, -1).index];
    """)
    assert out[0] == [0, 0.4]
    assert [x["x0"] for x in out[1]["boxes"]] == [0, 0.4, 0.2] and out[1]["index"] == 1
    assert out[2] == 0
