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


def test_handles_only_on_the_selected_box_and_only_inside_it():
    """A drag that starts next to a box (even within the handle size of its corner) draws a new box."""
    out = run_js("""
        const px = [{x0: 0, y0: 0, x1: 100, y1: 100}, {x0: 50, y0: 50, x1: 150, y1: 150}];
        out = [G.hitTest(px, 98, 3, 6), G.hitTest(px, 98, 3, 6, 0), G.hitTest(px, 104, 3, 6, 0),
               G.hitTest(px, 75, 75, 6), G.hitTest(px, 75, 75, 6, 0), G.hitTest(px, 200, 200, 6, 1),
               G.hitTest(px, 151, 149, 6, 1), G.hitTest(px, 149, 149, 6, 1), G.hitTest(px, 100, 120, 6, 1),
               G.hitTest(px, 120, 52, 6, 1), G.hitTest(px, 52, 120, 6, 1), G.hitTest(px, 120, 148, 6, 1)];
    """)
    assert out == [
        {"index": 0, "part": "body"},  # not selected: no corner handle
        {"index": 0, "part": "ne"},  # selected: its corner, from inside
        {"index": -1, "part": "none"},  # 4 px outside the selected box's corner: a new box
        {"index": 1, "part": "body"},  # the later box is on top
        {"index": 0, "part": "body"},  # unless the selected one is under the pointer
        {"index": -1, "part": "none"},
        {"index": -1, "part": "none"},  # 1 px right of box 2's corner
        {"index": 1, "part": "se"},
        {"index": 1, "part": "body"},
        {"index": 1, "part": "n"}, {"index": 1, "part": "w"}, {"index": 1, "part": "s"},  # edge handles
    ]


def test_handle_zone_shrinks_so_a_small_box_can_still_be_moved():
    out = run_js("out = G.hitTest([{x0: 0, y0: 0, x1: 12, y1: 12}], 6, 6, 7, 0);")
    assert out == {"index": 0, "part": "body"}


def test_edge_resize_moves_one_side_only():
    out = run_js("""
        const b = {x0: 64, y0: 64, x1: 192, y1: 192, label: ""};
        out = [G.resizeBox(b, "e", 37, 50, 512, 512), G.resizeBox(b, "n", 30, -21, 512, 512)];
    """)
    assert out[0] == {"x0": 64, "y0": 64, "x1": 232, "y1": 192, "label": ""}
    assert out[1] == {"x0": 64, "y0": 40, "x1": 192, "y1": 192, "label": ""}


def test_arrow_nudge_moves_by_grid_steps_and_stays_on_the_canvas():
    out = run_js("""
        const b = [{x0: 0.125, y0: 0.125, x1: 0.25, y1: 0.25, label: "dog"}];
        out = [G.nudgeBox(b, 0, 8, 0, 512, 512)[0], G.nudgeBox(b, 0, 0, -64, 512, 512)[0], G.nudgeBox(b, 3, 8, 0, 512, 512)];
    """)
    assert out[0] == {"x0": 72 / 512, "y0": 0.125, "x1": 136 / 512, "y1": 0.25, "label": "dog"}
    assert out[1] == {"x0": 0.125, "y0": 0.0, "x1": 0.25, "y1": 0.125, "label": "dog"}
    assert out[2] == [{"x0": 0.125, "y0": 0.125, "x1": 0.25, "y1": 0.25, "label": "dog"}]


def test_auto_layout_matches_python():
    from comfyui_troupe.models.layout.layout import default_boxes

    for n, w, h in ((1, 1024, 1024), (2, 1024, 1024), (3, 1000, 600), (5, 1216, 832), (8, 1360, 768)):
        out = run_js(f"out = G.defaultBoxes({n}, {w}, {h}).map(b => [b.x0, b.y0, b.x1, b.y1]);")
        flat = [v for b in default_boxes(n, w, h) for v in b]
        assert [v for b in out for v in b] == pytest.approx(flat, abs=1e-12), (n, w, h)


def test_size_presets_are_on_the_latent_grid():
    out = run_js("out = G.SIZE_PRESETS;")
    assert len(out) >= 8 and all(w % 8 == 0 and h % 8 == 0 for _, w, h in out)
    assert {"SDXL 1024×1024", "FLUX 1360×768"} <= {label for label, _, _ in out}


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


def test_invalid_values_give_no_boxes_and_the_reason_and_valid_ones_round_trip():
    out = run_js("""
        const good = '{"version": 1, "boxes": [{"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9, "label": "dog"}, [0, 0, 0.5, 0.5]]}';
        const bad = ["not json", '{"boxes": 3}', "", '{"boxes": [{"x0": 0.5, "y0": 0, "x1": 0.2, "y1": 1}]}',
                     '{"boxes": [[0, 0, 2, 1]]}', '{"boxes": [{"x0": 0, "y0": 0, "x1": 1}]}', '[1, 2]',
                     '{"version": 2, "boxes": []}', '{"boxes": [[0, 0, "1", 1]]}',
                     JSON.stringify({boxes: Array(9).fill([0, 0, 1, 1])}), '{"boxes": [{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "label": 5}]}'];
        out = [bad.map(G.readLayout), G.parseLayout("not json"), G.readLayout(good).error,
               G.serialiseLayout(G.parseLayout(good))];
    """)
    results, parsed_bad, good_error, round_trip = out
    assert all(r["boxes"] == [] for r in results) and parsed_bad == []
    reasons = [r["error"] for r in results]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == '"boxes" must be a list'
    assert reasons[2] == "the value is empty"
    assert reasons[3] == "box 1: zero or negative area; need x0 < x1 and y0 < y1"
    assert reasons[4] == "box 1: x1=2 is out of range [0, 1]"  # shown as such, never clamped to 1
    assert reasons[5] == "box 1: missing y1"
    assert reasons[6] == 'expected a JSON object with a "boxes" list'
    assert reasons[7] == "unsupported layout version 2"
    assert reasons[8] == 'box 1: x1 must be a finite number, got "1"'
    assert reasons[9] == "at most 8 boxes (one per subject), got 9"
    assert reasons[10] == "box 1: label must be a string"
    assert good_error is None
    assert json.loads(round_trip) == {"version": 1, "boxes": [
        {"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9, "label": "dog"}, {"x0": 0, "y0": 0, "x1": 0.5, "y1": 0.5}]}


def test_every_value_python_refuses_is_invalid_in_the_editor_too():
    """The table of bad values the server test refuses: the editor shows each as invalid, with a reason."""
    from comfyui_troupe.models.layout.layout import LayoutError, parse_layout_json

    values = ["not json", '{"boxes": 3}', '{"boxes": [{"x0": 0.5, "y0": 0, "x1": 0.2, "y1": 1}]}',
              '{"boxes": [[0, 0, 2, 1]]}', '{"boxes": [[0, 0, 1]]}', '{"boxes": [null]}', '{"version": 3, "boxes": []}',
              '{"boxes": [{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "label": []}]}', '{"boxes": [[0, 0, true, 1]]}', "[]",
              '{"boxes": [[0, 0, 1e999, 1]]}']
    out = run_js(f"out = {json.dumps(values)}.map(v => G.readLayout(v).error);")
    for value, reason in zip(values, out):
        with pytest.raises(LayoutError):
            parse_layout_json(value)
        assert reason, f"the editor accepts {value!r}, which Python refuses"


def test_delete_and_reorder():
    out = run_js("""
        const b = [{x0: 0, y0: 0, x1: 0.1, y1: 0.1}, {x0: 0.2, y0: 0, x1: 0.3, y1: 0.1}, {x0: 0.4, y0: 0, x1: 0.5, y1: 0.1}];
        out = [G.deleteBox(b, 1).map(x => x.x0), G.reorderBox(b, 2, -1), G.reorderBox(b, 0, -1).index];
    """)
    assert out[0] == [0, 0.4]
    assert [x["x0"] for x in out[1]["boxes"]] == [0, 0.4, 0.2] and out[1]["index"] == 1
    assert out[2] == 0
