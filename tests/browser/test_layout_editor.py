"""The TroupeLayout box editor (web/js/troupe_layout_editor.js) driven with real mouse events in Chromium.

The frontend runs against the real ComfyUI server; the boxes JSON widget is the one source of
truth, so each test checks it, the prompt the UI queues, the rendered preview and a reload.
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from playwright import sync_api

WAIT_MS = 90_000  # an upper bound for polled waits (never slept): a loaded 2-core machine can take long
RED, GREEN = (0xE6, 0x19, 0x4B), (0x3C, 0xB4, 0x4B)
BLANK = round(0.12 * 255)


# --------------------------------------------------------------------------- fixtures and helpers


def build_graph(page, width: int = 512, height: int = 512, preview: bool = True, zoom: float = 1.0,
                offset: tuple[float, float] = (120, 110)) -> dict:
    """Clear the graph, add a TroupeLayout (and a linked preview) at the given zoom; return the node ids."""
    # An empty workflow through loadGraphData, not app.graph.clear(): clear() reuses node ids without
    # telling the Vue node renderer, which then keeps the old node's DOM for the new node.
    ids = page.evaluate("""async ([width, height, preview, zoom, offset]) => {
        await app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {},
                                 extra: {ds: {scale: zoom, offset}}, version: 0.4});
        app.canvas.ds.scale = zoom;
        app.canvas.ds.offset = offset;
        const layout = LiteGraph.createNode("TroupeLayout");
        layout.pos = [0, 0];
        app.graph.add(layout);
        layout.widgets.find(w => w.name === "width").value = width;
        layout.widgets.find(w => w.name === "height").value = height;
        layout.setSize([560, 640]);
        let p = null;
        if (preview) {
            p = LiteGraph.createNode("TroupeLayoutPreview");
            p.pos = [640, 0];
            app.graph.add(p);
            p.setSize([520, 560]);
            layout.connect(0, p, 0);
        }
        app.graph.setDirtyCanvas(true, true);
        return {layout: layout.id, preview: p?.id ?? null};
    }""", [width, height, preview, zoom, list(offset)])
    wait_for_editor(page, ids["layout"])
    return ids


EDITOR_STATE = """(id) => {
    const ed = app.graph.getNodeById(id)?.troupeEditor;
    if (!ed) return {editor: false};
    app.graph.setDirtyCanvas(true, true);
    const r = ed.canvas.getBoundingClientRect();
    const screenScale = ed.computeView().s * r.width / ed.canvas.clientWidth;  // screen px per image px
    const ready = ed.canvas.isConnected && r.width > 200 && r.height > 200 && r.top > 0
        && r.bottom < window.innerHeight && screenScale > 0.5;
    return {ready, connected: ed.canvas.isConnected, rect: [r.left, r.top, r.width, r.height], view: ed.view,
            drawn: app.canvas.graph === app.graph, visible: ed.widget.isVisible(), lowQuality: app.canvas.low_quality,
            zoom: app.canvas.ds.scale, widgets: document.querySelectorAll(".dom-widget").length};
}"""


def wait_for_editor(page, node_id) -> None:
    """Wait until the node's editor canvas is laid out, pan the graph so it is on screen, wait for its view."""
    # Renderers lay nodes out differently (the Vue renderer of frontend >= 1.49 makes them taller), so pan the
    # way a user would rather than rely on one frontend's node sizes.
    laid_out = ("(id) => { const ed = app.graph.getNodeById(id)?.troupeEditor;"
                " return !!ed && ed.canvas.isConnected && ed.canvas.getBoundingClientRect().width > 200; }")
    try:
        page.wait_for_function(laid_out, arg=node_id, timeout=WAIT_MS, polling=200)
    except sync_api.TimeoutError:
        pytest.fail(f"the editor was not laid out: {page.evaluate(EDITOR_STATE, node_id)}")
    fits = page.evaluate("""(id) => {
        const r = app.graph.getNodeById(id).troupeEditor.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        if (r.height > window.innerHeight - 40 || r.width > window.innerWidth - 40) return false;
        if (r.top < 20 || r.bottom > window.innerHeight - 20) ds.offset[1] += (20 - r.top) / ds.scale;
        if (r.left < 20 || r.right > window.innerWidth - 20) ds.offset[0] += (20 - r.left) / ds.scale;
        app.graph.setDirtyCanvas(true, true);
        return true;
    }""", node_id)
    assert fits, f"the editor is larger than the viewport: {page.evaluate(EDITOR_STATE, node_id)}"
    try:
        page.wait_for_function(f"(id) => ({EDITOR_STATE})(id).ready", arg=node_id, timeout=WAIT_MS, polling=200)
    except sync_api.TimeoutError:
        pytest.fail(f"the editor did not show: {page.evaluate(EDITOR_STATE, node_id)}")


def client_point(page, node_id, x: float, y: float) -> tuple[float, float]:
    """Viewport coordinates of canvas pixel (x, y) of the node's editor, checked to lie on its <canvas>."""
    p = page.evaluate("""([id, x, y]) => {
        const ed = app.graph.getNodeById(id).troupeEditor;
        const r = ed.canvas.getBoundingClientRect();
        const p = ed.toClient(x, y);
        return {x: p.x, y: p.y, inside: p.x >= r.left && p.x <= r.right && p.y >= r.top && p.y <= r.bottom};
    }""", [node_id, x, y])
    assert p["inside"], f"canvas pixel ({x}, {y}) maps outside the editor element"
    return p["x"], p["y"]


def drag(page, node_id, start, end, button: str = "left") -> None:
    """A real mouse drag between two canvas pixels, in small steps so pointermove fires."""
    page.mouse.move(*client_point(page, node_id, *start))
    page.mouse.down(button=button)
    page.mouse.move(*client_point(page, node_id, *end), steps=12)
    page.mouse.up(button=button)


def click(page, node_id, at, button: str = "left") -> None:
    page.mouse.click(*client_point(page, node_id, *at), button=button)


def boxes_value(page, node_id) -> str:
    return page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'boxes').value", node_id)


def boxes(page, node_id) -> list[dict]:
    return json.loads(boxes_value(page, node_id))["boxes"]


def wait_until(page, node_id, condition: str, what: str) -> None:
    """Wait for a JS condition on `ed` (the node's editor) and `boxes` (its parsed JSON value); fail saying what."""
    fn = (f"(id) => {{ const ed = app.graph.getNodeById(id)?.troupeEditor; if (!ed) return false;"
          f" const boxes = JSON.parse(ed.valueWidget.value).boxes; return {condition}; }}")
    try:
        page.wait_for_function(fn, arg=node_id, timeout=WAIT_MS, polling=100)
    except sync_api.TimeoutError:
        state = page.evaluate("(id) => { const ed = app.graph.getNodeById(id)?.troupeEditor;"
                              " return ed && {value: ed.valueWidget.value, selected: ed.selected, view: ed.view}; }",
                              node_id)
        pytest.fail(f"timed out waiting for {what} ({condition}); editor: {state}")


def wait_boxes(page, node_id, count: int) -> list[dict]:
    wait_until(page, node_id, f"boxes.length === {count}", f"{count} boxes")
    return boxes(page, node_id)


def wait_selected(page, node_id, index: int) -> None:
    wait_until(page, node_id, f"ed.canvas.dataset.selected === '{index}'", f"box {index + 1} selected")


def px(*values: int) -> dict:
    """A normalised box on the 512 x 512 canvas from pixel edges."""
    return dict(zip(("x0", "y0", "x1", "y1"), (v / 512 for v in values)))


def node_screenshot(page, node_ids, path) -> None:
    """Screenshot the area of the given nodes (title bar included)."""
    rect = page.evaluate("""(ids) => {
        const c = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        const th = LiteGraph.NODE_TITLE_HEIGHT;
        let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
        for (const id of ids) {
            const n = app.graph.getNodeById(id);
            const [a, b] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th]);
            const [e, f] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
            x0 = Math.min(x0, a); y0 = Math.min(y0, b); x1 = Math.max(x1, e); y1 = Math.max(y1, f);
        }
        return {x: c.left + x0 - 12, y: c.top + y0 - 12, width: x1 - x0 + 24, height: y1 - y0 + 24};
    }""", node_ids)
    page.screenshot(path=str(path), clip=rect)


def wait_history(server, known: set[str], timeout: float = 180.0) -> tuple[str, dict]:
    """The first finished /history entry whose id is not in `known`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = server.get("/history").json()
        for pid, entry in hist.items():
            if pid not in known and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                assert status.get("status_str") == "success", f"prompt failed: {json.dumps(status)[:3000]}"
                return pid, entry
        time.sleep(0.3)
    raise TimeoutError(f"no new prompt finished in {timeout} s; server log:\n{server.log()[-3000:]}")


def pixel(img: np.ndarray, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in img[y, x, :3])


def assert_colour(img: np.ndarray, x: int, y: int, rgb, what: str, tol: int = 3) -> None:
    got = pixel(img, x, y)
    assert max(abs(a - b) for a, b in zip(got, rgb)) <= tol, f"{what} at ({x}, {y}): {got}, expected {rgb}"


# --------------------------------------------------------------------------- tests


def test_draw_move_queue_preview_and_reload(page, comfy_server, artifacts):
    ids = build_graph(page)
    node = ids["layout"]
    assert boxes(page, node) == []

    # Off-grid drags: edges snap to the 8-px grid (65 -> 64, 71 -> 72, 201 -> 200, 303 -> 304).
    drag(page, node, (65, 71), (201, 303))
    assert wait_boxes(page, node, 1) == [px(64, 72, 200, 304)]
    drag(page, node, (321, 127), (447, 407))
    wait_boxes(page, node, 2)
    # Move box 1 by (+41, +39): its corner snaps from (64, 72) to (104, 112), its size is kept.
    drag(page, node, (132, 188), (173, 227))
    wait_until(page, node, "boxes[0].x0 !== 0.125", "box 1 to move")
    expected = [px(104, 112, 240, 344), px(320, 128, 448, 408)]
    assert boxes(page, node) == expected
    value = boxes_value(page, node)
    node_screenshot(page, [node], artifacts / "layout_editor.png")

    # Queue from the UI; the executed prompt carries exactly the widget's JSON.
    known = set(comfy_server.get("/history").json())
    page.evaluate("() => app.queuePrompt(0)")
    _, entry = wait_history(comfy_server, known)
    prompt = entry["prompt"][2]
    assert prompt[str(node)]["class_type"] == "TroupeLayout"
    assert prompt[str(node)]["inputs"]["boxes"] == value
    assert prompt[str(node)]["inputs"]["width"] == 512 and prompt[str(node)]["inputs"]["height"] == 512
    assert "layout_editor" not in prompt[str(node)]["inputs"]

    # The preview draws box 1 in #e6194b and box 2 in #3cb44b at the snapped pixels (3-px outline).
    images = entry["outputs"][str(ids["preview"])]["images"]
    # Through /view (what the UI shows), not the disk: --temp-directory gains a "temp" subfolder.
    view = comfy_server.get("/view", params={k: images[0].get(k, "") for k in ("filename", "subfolder", "type")})
    img = np.asarray(Image.open(io.BytesIO(view.content)).convert("RGB"))
    assert img.shape[:2] == (512, 512)
    assert_colour(img, 105, (112 + 343) // 2, RED, "box 1 left edge")
    assert_colour(img, (104 + 239) // 2, 342, RED, "box 1 bottom edge")
    assert_colour(img, 321, (128 + 407) // 2, GREEN, "box 2 left edge")
    assert_colour(img, (320 + 447) // 2, 406, GREEN, "box 2 bottom edge")
    for x, y in ((20, 20), (280, 470), (500, 60), (100, 110)):
        assert_colour(img, x, y, (BLANK,) * 3, "background")
    node_screenshot(page, [node, ids["preview"]], artifacts / "layout_editor_with_preview.png")

    # Serialise, reload: the editor shows the same boxes again.
    restored = page.evaluate("""async () => {
        const wf = JSON.parse(JSON.stringify(app.graph.serialize()));
        app.graph.clear();
        await app.loadGraphData(wf);
        const n = app.graph.nodes.find(n => n.type === "TroupeLayout");
        return {id: n.id, value: n.widgets.find(w => w.name === "boxes").value, editor: n.troupeEditor.boxes.length,
                values: wf.nodes.find(x => x.type === "TroupeLayout").widgets_values};
    }""")
    assert restored["value"] == value
    assert restored["editor"] == 2
    assert restored["values"] == [512, 512, value]  # the canvas widget is not serialised
    assert not page.troupe_errors, page.troupe_errors


def test_aspect_change_keeps_boxes_and_delete_removes_them(page, artifacts):
    ids = build_graph(page, preview=False)
    node = ids["layout"]
    drag(page, node, (40, 40), (250, 250))
    drag(page, node, (300, 300), (480, 470))
    before = wait_boxes(page, node, 2)

    # A wider canvas: same normalised boxes, drawn at the new aspect ratio.
    page.evaluate("""(id) => {
        const w = app.graph.getNodeById(id).widgets.find(w => w.name === "width");
        w.value = 1024;
        w.callback?.(1024);
        app.graph.setDirtyCanvas(true, true);
    }""", node)
    wait_until(page, node, "Math.abs(ed.view.s * 1024 - (ed.canvas.clientWidth - 12)) < 1", "the wide redraw")
    assert boxes(page, node) == before
    colour = page.evaluate("""(id) => {
        const ed = app.graph.getNodeById(id).troupeEditor, {s, ox, oy} = ed.view, d = window.devicePixelRatio || 1;
        const x = Math.round((ox + 0.078125 * 1024 * s + 1) * d), y = Math.round((oy + 0.3 * 512 * s) * d);
        return Array.from(ed.canvas.getContext("2d").getImageData(x, y, 1, 1).data);
    }""", node)
    assert max(abs(a - b) for a, b in zip(colour[:3], RED)) <= 3, colour
    node_screenshot(page, [node], artifacts / "layout_editor_wide.png")

    # Right-click deletes the box under the pointer; click + Delete removes the selected one.
    click(page, node, (800, 400), button="right")
    assert wait_boxes(page, node, 1) == before[:1]
    click(page, node, (300, 150))
    wait_selected(page, node, 0)
    page.keyboard.press("Delete")
    assert wait_boxes(page, node, 0) == []
    assert page.evaluate("(id) => !!app.graph.getNodeById(id)", node), "Delete removed the node, not the box"

    # Ctrl+Z restores the workflow state before the delete; onConfigure reads the boxes back.
    page.keyboard.press("Control+z")
    page.wait_for_function("() => app.graph.nodes.find(n => n.type === 'TroupeLayout')?.troupeEditor.boxes.length === 1",
                           timeout=WAIT_MS)
    node = page.evaluate("() => app.graph.nodes.find(n => n.type === 'TroupeLayout').id")
    assert boxes(page, node) == before[:1]
    click(page, node, (300, 150))
    page.keyboard.press("Backspace")
    wait_boxes(page, node, 0)

    # Reorder: select box 1 and press ] -> it becomes box 2.
    drag(page, node, (40, 40), (200, 200))
    drag(page, node, (600, 100), (900, 400))
    two = wait_boxes(page, node, 2)
    click(page, node, (100, 100))
    page.keyboard.press("]")
    wait_selected(page, node, 1)
    assert boxes(page, node) == [two[1], two[0]]

    # Resize by a corner: drag box 1's bottom-right corner by (+37, +45) canvas pixels; the corner snaps to the
    # 8-px grid (+40, +48) and the opposite corner stays where it was.
    first = two[1]
    x1, y1 = round(first["x1"] * 1024), round(first["y1"] * 512)
    click(page, node, ((first["x0"] + first["x1"]) * 512, (first["y0"] + first["y1"]) * 256))  # handles: selected box only
    wait_selected(page, node, 0)
    drag(page, node, (x1 - 1, y1 - 1), (x1 + 36, y1 + 44))
    wait_until(page, node, f"boxes[0].x1 === {(x1 + 40) / 1024}", "the corner resize")
    assert boxes(page, node)[0] == {**first, "x1": (x1 + 40) / 1024, "y1": (y1 + 48) / 512}
    assert boxes(page, node)[1] == two[0]
    assert not page.troupe_errors, page.troupe_errors


def test_vue_node_renderer(page, artifacts):
    """The same editor under the Vue node renderer ("Nodes 2.0"), which sizes widgets by content."""
    set_vue = "(on) => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)"
    page.evaluate(set_vue, True)
    try:
        page.wait_for_function("() => LiteGraph.vueNodesMode === true", timeout=WAIT_MS)
        # 1024 x 1024 (the defaults: the Vue widgets do not show values set from JS) and the first
        # test's drags at twice the coordinates, so the same normalised boxes come out.
        # The Vue renderer sizes the node itself (setSize is not applied): zoom in so that one image
        # pixel is more than half a screen pixel.
        node = build_graph(page, 1024, 1024, preview=False, zoom=1.6, offset=(200, 80))["layout"]
        pos = page.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node)
        assert page.evaluate("() => document.querySelectorAll('textarea').length") == 0, "the JSON widget shows"
        drag(page, node, (130, 142), (402, 606))
        drag(page, node, (642, 254), (894, 814))
        drag(page, node, (264, 376), (346, 454))
        wait_until(page, node, "boxes[0]?.x0 === 104 / 512", "box 1 to move")
        assert boxes(page, node) == [px(104, 112, 240, 344), px(320, 128, 448, 408)]
        after = page.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node)
        assert after == pytest.approx(pos, abs=1), "the drag moved the node"  # Vue layout sync adds float noise
        rect = page.evaluate("(id) => { const r = document.querySelector(`[data-node-id='${id}']`)"
                             ".getBoundingClientRect(); return {x: r.left - 8, y: r.top - 8,"
                             " width: r.width + 16, height: r.height + 16}; }", node)
        page.screenshot(path=str(artifacts / "layout_editor_vue.png"), clip=rect)
        click(page, node, (768, 600), button="right")
        assert wait_boxes(page, node, 1) == [px(104, 112, 240, 344)]
    finally:
        page.evaluate(set_vue, False)
    assert not page.troupe_errors, page.troupe_errors
