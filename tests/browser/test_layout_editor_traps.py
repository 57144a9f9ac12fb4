"""The box editor without traps (issue 15, item 5), in both node renderers, with real mouse and keyboard events.

Drags next to a box draw a new box; a refused 9th box says why; disabled buttons look disabled; connected
subjects label the boxes and give the dashed auto layout; double-click types a label; arrow keys nudge; size
presets; a garbage stored value (fuzzed) shows an error state with the reason instead of a clamped layout.
"""
from __future__ import annotations

import json
import random

import pytest

from tests.browser.test_layout_editor import (
    WAIT_MS,
    boxes,
    boxes_value,
    build_graph,
    client_point,
    drag,
    wait_boxes,
    wait_until,
)

SET_VUE = "(on) => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)"
ERROR_RED = (0xFF, 0x6B, 0x6B)


@pytest.fixture(params=["classic", "vue"])
def editor(request, page):
    """A fresh TroupeLayout in the given renderer: (node id, k) where canvas pixel = k x the 512-px coordinates."""
    vue = request.param == "vue"
    page.evaluate(SET_VUE, vue)
    page.wait_for_function(f"() => !!LiteGraph.vueNodesMode === {str(vue).lower()}", timeout=WAIT_MS)
    try:
        if vue:  # the Vue widgets keep their defaults (1024 x 1024); zoom so one image px > half a screen px
            yield build_graph(page, 1024, 1024, preview=False, zoom=1.6, offset=(200, 80))["layout"], 2
        else:
            yield build_graph(page, preview=False)["layout"], 1
    finally:
        page.evaluate(SET_VUE, False)
        page.wait_for_function("() => !LiteGraph.vueNodesMode", timeout=WAIT_MS)
    assert not page.troupe_errors, page.troupe_errors


def set_value(page, node, value: str) -> None:
    """Write the hidden value as a script or an extension would; the editor reads it back on its next draw
    (sync), which the Vue renderer only runs on its own redraws, so the test calls it."""
    page.evaluate("([id, v]) => { const n = app.graph.getNodeById(id); n.widgets.find(w => w.name === 'boxes').value = v;"
                  " app.graph.setDirtyCanvas(true, true); n.troupeEditor.sync(); }", [node, value])


def layout_json(*px_boxes, size: int) -> str:
    return json.dumps({"version": 1, "boxes": [dict(zip(("x0", "y0", "x1", "y1"), (v / size for v in b)))
                                               for b in px_boxes]})


def editor_state(page, node) -> dict:
    return page.evaluate("""(id) => {
        const ed = app.graph.getNodeById(id).troupeEditor, b = ed.buttons;
        const look = (x) => ({disabled: x.disabled, opacity: getComputedStyle(x).opacity});
        return {error: ed.canvas.dataset.error, info: ed.info.textContent, infoColour: getComputedStyle(ed.info).color,
                drawn: ed.boxes.length, auto: ed.canvas.dataset.auto, labels: ed.labels,
                buttons: {delete: look(b.delete), earlier: look(b.earlier), later: look(b.later), clear: look(b.clear)}};
    }""", node)


def red_pixels(page, node) -> int:
    """How many pixels of the editor canvas have the error red."""
    return page.evaluate("""([id, rgb]) => {
        const c = app.graph.getNodeById(id).troupeEditor.canvas;
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4)
            if (Math.abs(d[i] - rgb[0]) < 40 && Math.abs(d[i + 1] - rgb[1]) < 40 && Math.abs(d[i + 2] - rgb[2]) < 40) n++;
        return n;
    }""", [node, list(ERROR_RED)])


# --------------------------------------------------------------------------- tests


def test_a_drag_next_to_a_box_draws_a_new_box(page, editor):
    node, k = editor
    drag(page, node, (65 * k, 71 * k), (201 * k, 303 * k))
    first = wait_boxes(page, node, 1)[0]  # (64, 72)-(200, 304), selected
    # Start 3 canvas px right of and below its bottom-right corner (within the old 7-px grab zone).
    drag(page, node, (203 * k, 307 * k), (320 * k, 420 * k))
    two = wait_boxes(page, node, 2)
    assert two[0] == first, "the drag resized the box instead of drawing a new one"
    # The selected box's corner, from inside, still resizes it; then its right edge moves only the right side.
    b = two[1]
    x1, y1 = b["x1"] * 512 * k, b["y1"] * 512 * k
    drag(page, node, (x1 - 2 * k, y1 - 2 * k), (x1 + 30 * k, y1 + 30 * k))
    wait_until(page, node, f"boxes[1].x1 > {b['x1']} && boxes[1].y1 > {b['y1']}", "the corner resize")
    b = boxes(page, node)[1]
    x1, mid = b["x1"] * 512 * k, (b["y0"] + b["y1"]) / 2 * 512 * k
    drag(page, node, (x1 - 2 * k, mid), (x1 + 40 * k, mid))
    wait_until(page, node, f"boxes[1].x1 > {b['x1']}", "the edge resize")
    after = boxes(page, node)
    assert (after[1]["x0"], after[1]["y0"], after[1]["y1"]) == (b["x0"], b["y0"], b["y1"]) and after[0] == first


def test_ninth_box_is_refused_with_a_message_and_disabled_buttons_look_disabled(page, editor):
    node, k = editor
    state = editor_state(page, node)
    for name in ("delete", "earlier", "later", "clear"):  # nothing drawn, nothing selected
        assert state["buttons"][name] == {"disabled": True, "opacity": "0.35"}, (name, state)
    size = 512 * k
    eight = [(i * 64 * k, 0, (i * 64 + 56) * k, 64 * k) for i in range(8)]
    set_value(page, node, layout_json(*eight, size=size))
    wait_until(page, node, "ed.boxes.length === 8", "8 boxes read back")
    drag(page, node, (40 * k, 200 * k), (200 * k, 400 * k))
    wait_until(page, node, "ed.info.textContent.includes('at most 8 boxes')", "the refusal message")
    state = editor_state(page, node)
    assert len(boxes(page, node)) == 8
    assert state["infoColour"] == "rgb(255, 107, 107)", state
    assert state["buttons"]["clear"] == {"disabled": False, "opacity": "1"}
    # Select a box: Delete and Later enable, Earlier stays disabled for the first box.
    drag(page, node, (20 * k, 20 * k), (20 * k, 20 * k))
    wait_until(page, node, "ed.canvas.dataset.selected === '0'", "box 1 selected")
    state = editor_state(page, node)
    assert state["buttons"]["delete"]["opacity"] == "1" and state["buttons"]["later"]["opacity"] == "1"
    assert state["buttons"]["earlier"] == {"disabled": True, "opacity": "0.35"}


def test_arrow_keys_nudge_and_double_click_types_a_label_and_presets_set_the_size(page, editor):
    node, k = editor
    drag(page, node, (64 * k, 64 * k), (192 * k, 192 * k))
    before = wait_boxes(page, node, 1)[0]  # selected, focused canvas
    page.keyboard.press("ArrowRight")
    # (the JSON keeps 6 decimals)
    wait_until(page, node, f"Math.abs(boxes[0].x0 - {before['x0']} - 8 / {512 * k}) < 1e-6", "one grid step right")
    page.keyboard.press("Shift+ArrowDown")
    wait_until(page, node, f"Math.abs(boxes[0].y0 - {before['y0']} - 64 / {512 * k}) < 1e-6", "8 grid steps down")
    page.mouse.dblclick(*client_point(page, node, 120 * k, 140 * k))
    page.wait_for_selector("input[data-troupe='label-input']", timeout=WAIT_MS)
    page.keyboard.press("Control+a")
    page.keyboard.type("corgi")
    page.keyboard.press("Enter")
    wait_until(page, node, "boxes[0].label === 'corgi'", "the typed label")
    assert page.evaluate("() => !document.querySelector(\"input[data-troupe='label-input']\")")
    # A size preset sets both width and height; the normalised boxes are kept.
    kept = boxes_value(page, node)
    page.evaluate("(id) => { const s = app.graph.getNodeById(id).troupeEditor.presets;"
                  " s.value = '1216x832'; s.dispatchEvent(new Event('change')); }", node)
    size = page.evaluate("(id) => ['width', 'height'].map(n => app.graph.getNodeById(id).widgets"
                         ".find(w => w.name === n).value)", node)
    assert size == [1216, 832] and boxes_value(page, node) == kept


def test_connected_subjects_label_the_boxes_and_give_the_dashed_auto_layout(page, editor, artifacts):
    node, k = editor
    page.evaluate("""(id) => {
        const layout = app.graph.getNodeById(id);
        const list = LiteGraph.createNode("TroupeSubjectList");
        list.pos = [layout.pos[0] - 320, layout.pos[1] + 700];
        app.graph.add(list);
        ["dog", "teapot", "cat"].forEach((label, i) => {
            const s = LiteGraph.createNode("TroupeSubject");
            s.pos = [layout.pos[0] - 700, layout.pos[1] + 600 + i * 160];
            app.graph.add(s);
            s.widgets.find(w => w.name === "label").value = label;
            s.connect(0, list, i === 2 ? 3 : i);  // slot 3 empty: skipped, like the Python list
        });
        list.connect(0, layout, layout.inputs.findIndex(i => i.name === "subjects"));
        app.graph.setDirtyCanvas(true, true);
    }""", node)
    wait_until(page, node, "ed.canvas.dataset.auto === '3'", "the dashed auto layout of 3 subjects")
    state = editor_state(page, node)
    assert state["labels"] == ["dog", "teapot", "cat"] and state["drawn"] == 0
    assert json.loads(boxes_value(page, node))["boxes"] == []  # the auto layout is drawn, not stored
    if k == 1:
        from tests.browser.test_layout_editor import node_screenshot

        node_screenshot(page, [node], artifacts / "layout_editor_auto_layout.png")
    drag(page, node, (64 * k, 64 * k), (192 * k, 192 * k))
    wait_boxes(page, node, 1)
    wait_until(page, node, "ed.canvas.dataset.auto === '0'", "the auto layout gone once a box is drawn")


# Garbage for the hidden value: structured near-misses and random text, seeded so a failure reproduces.
NEAR_MISSES = ["", "{", "null", "[]", "42", '"boxes"', '{"boxes": null}', '{"boxes": {}}', '{"version": 2, "boxes": []}',
               '{"boxes": [[0, 0, 1.5, 1]]}', '{"boxes": [[-0.1, 0, 1, 1]]}', '{"boxes": [[0.5, 0, 0.5, 1]]}',
               '{"boxes": [[0, 0, 1]]}', '{"boxes": [{"x0": 0, "y0": 0, "x1": 1}]}', '{"boxes": [[0, 0, "1", 1]]}',
               '{"boxes": [[0, 0, NaN, 1]]}', '{"boxes": [{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "label": 7}]}',
               json.dumps({"boxes": [[0, 0, 1, 1]] * 9})]


def fuzzed_values(seed: int = 15, count: int = 12) -> list[str]:
    rng = random.Random(seed)
    alphabet = '{}[]",:0123456789.-eE boxesversionx0y1label\\\n\t\u00e9\U0001f600'
    out = []
    for _ in range(count):
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
    for _ in range(count):  # valid JSON shapes with one wrong value
        box = [rng.choice([0, 0.25, 0.5, 1, -1, 2, None, "a", True, [], {}]) for _ in range(4)]
        out.append(json.dumps({"version": 1, "boxes": [box]}))
    return out


def test_a_garbage_stored_value_shows_an_error_state_not_a_clamped_canvas(page, editor, artifacts):
    from comfyui_troupe.models.layout.layout import LayoutError, parse_layout_json

    node, k = editor
    checked = 0
    for value in NEAR_MISSES + fuzzed_values():
        try:
            parse_layout_json(value)
            continue  # Python accepts it (a random string can be valid): not garbage
        except LayoutError:
            pass
        set_value(page, node, value)
        page.wait_for_function("([id, v]) => { const ed = app.graph.getNodeById(id).troupeEditor;"
                               " app.graph.setDirtyCanvas(true, true); return ed.lastValue === v; }",
                               arg=[node, value], timeout=WAIT_MS, polling=100)
        state = editor_state(page, node)
        assert state["error"], f"no error state for {value!r}: {state}"
        assert state["drawn"] == 0, f"{value!r} was drawn ({state['drawn']} boxes)"
        assert state["info"] == "stored layout is invalid", state
        checked += 1
    assert checked >= 20
    # The reason is drawn on the canvas in red, and a drag cannot edit the invalid value.
    set_value(page, node, '{"boxes": [[0, 0, 2, 1]]}')
    page.wait_for_function("(id) => { app.graph.setDirtyCanvas(true, true); return app.graph.getNodeById(id)"
                           ".troupeEditor.canvas.dataset.error.includes('x1=2 is out of range'); }",
                           arg=node, timeout=WAIT_MS, polling=100)
    assert red_pixels(page, node) > 50
    if k == 1:
        from tests.browser.test_layout_editor import node_screenshot

        node_screenshot(page, [node], artifacts / "layout_editor_invalid_value.png")
    drag(page, node, (40 * k, 40 * k), (200 * k, 200 * k))
    assert boxes_value(page, node) == '{"boxes": [[0, 0, 2, 1]]}'
    # Clear starts again from an empty, valid layout.
    page.evaluate("(id) => app.graph.getNodeById(id).troupeEditor.buttons.clear.click()", node)
    wait_until(page, node, "ed.canvas.dataset.error === '' && boxes.length === 0", "Clear to reset the value")
