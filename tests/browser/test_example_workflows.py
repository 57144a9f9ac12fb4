"""The shipped example_workflows opened in the real frontend: no two nodes overlap, in either node renderer,
the graph starts clear of the sidebar, and the README's picture is a real screenshot of the demo workflow."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from playwright import sync_api

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
WAIT_MS = 90_000
SET_VUE = "(on) => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)"

# Every node's on-screen rectangle (title included): the litegraph bounding box in the classic renderer, the
# node's DOM element in the Vue renderer (which sizes nodes by their content).
NODE_RECTS = """() => {
    const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
    return app.graph.nodes.map(n => {
        const el = document.querySelector(`[data-node-id='${n.id}']`);
        if (LiteGraph.vueNodesMode && el) {
            const r = el.getBoundingClientRect();
            return {id: n.id, type: n.type, x0: r.left, y0: r.top, x1: r.right, y1: r.bottom};
        }
        const b = n.getBounding();
        const [x0, y0] = ds.convertOffsetToCanvas([b[0], b[1]]);
        const [x1, y1] = ds.convertOffsetToCanvas([b[0] + b[2], b[1] + b[3]]);
        return {id: n.id, type: n.type, x0: c.left + x0, y0: c.top + y0, x1: c.left + x1, y1: c.top + y1};
    });
}"""

SIDEBAR_RIGHT = """() => {
    const bar = document.querySelector('.side-tool-bar-container, .side-bar-panel, nav.side-tool-bar-container');
    return bar ? bar.getBoundingClientRect().right : 0;
}"""


def load(page, path: Path) -> None:
    """Open a workflow as the template browser does; the missing-models dialog (the workflows name files this
    machine does not have, which is how the `models` metadata is seen to work) stays closed for the screenshots."""
    page.evaluate("""async (wf) => {
        await app.extensionManager.setting.set('Comfy.Workflow.ShowMissingModelsWarning', false);
        await app.loadGraphData(wf);
        app.graph.setDirtyCanvas(true, true);
    }""", json.loads(path.read_text()))
    page.wait_for_timeout(800)  # one layout pass of the DOM widgets / Vue nodes


def overlaps(rects: list[dict]) -> list[str]:
    found = []
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            w = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"])
            h = min(a["y1"], b["y1"]) - max(a["y0"], b["y0"])
            if w > 0 and h > 0:
                found.append(f"{a['type']} #{a['id']} and {b['type']} #{b['id']} overlap by {w:.0f} x {h:.0f} px")
    return found


def check_workflows(page, renderer: str, shots: Path | None = None) -> None:
    """Load each workflow; collect overlaps and nodes under the sidebar; save a screenshot per workflow in `shots`
    (the template browser's thumbnails, example_workflows/<name>.jpg, are these screenshots)."""
    problems = []
    for path in WORKFLOWS:
        load(page, path)
        if shots is not None:
            page.screenshot(path=str(shots / f"{path.stem}.jpg"), type="jpeg", quality=70)
        rects = page.evaluate(NODE_RECTS)
        assert rects, f"{path.name}: no nodes"
        problems += [f"{path.name} ({renderer}): {p}" for p in overlaps(rects)]
        left = min(r["x0"] for r in rects)
        sidebar = page.evaluate(SIDEBAR_RIGHT)
        if left < sidebar + 4:
            problems.append(f"{path.name} ({renderer}): the leftmost node starts at x={left:.0f}, under the "
                            f"sidebar (right edge {sidebar:.0f})")
    assert not problems, "\n".join(problems)


def copy_photos(server) -> None:
    """The example photos the workflows' LoadImage nodes name, as `make host` puts them in ComfyUI's input/."""
    for photo in (ROOT / "assets").glob("*.jpg"):
        shutil.copy(photo, server.input_dir / photo.name)


def test_example_workflows_do_not_overlap_classic(page, comfy_server, artifacts):
    copy_photos(comfy_server)
    shots = artifacts / "example_workflows"
    shots.mkdir(exist_ok=True)
    check_workflows(page, "classic", shots)
    assert not page.troupe_errors, page.troupe_errors


def test_example_workflows_do_not_overlap_vue(page):
    page.evaluate(SET_VUE, True)
    try:
        page.wait_for_function("() => LiteGraph.vueNodesMode === true", timeout=WAIT_MS)
        check_workflows(page, "vue")
    finally:
        page.evaluate(SET_VUE, False)
        page.wait_for_function("() => !LiteGraph.vueNodesMode", timeout=WAIT_MS)


def test_readme_picture(page, comfy_server, artifacts):
    """layout_basics queued from the UI; the box editor and the preview with the reference photos, screenshotted."""
    copy_photos(comfy_server)
    load(page, ROOT / "example_workflows" / "layout_basics.json")
    ids = page.evaluate("""() => {
        const f = t => app.graph.nodes.find(n => n.type === t).id;
        return {layout: f('TroupeLayout'), preview: f('TroupeLayoutPreview')};
    }""")
    known = set(comfy_server.get("/history").json())
    page.evaluate("() => app.queuePrompt(0)")
    try:
        page.wait_for_function("(id) => !!app.nodeOutputs?.[String(id)]?.images?.length || "
                               "!!app.graph.getNodeById(id).imgs?.length", arg=ids["preview"], timeout=WAIT_MS)
    except sync_api.TimeoutError:
        hist = {k: v.get("status") for k, v in comfy_server.get("/history").json().items() if k not in known}
        pytest.fail(f"the preview never showed: {hist}")
    # Frame the editor and the preview (at 0.8 zoom, the workflow's own) and let the preview image decode.
    page.evaluate("""(ids) => {
        const layout = app.graph.getNodeById(ids.layout), ds = app.canvas.ds;
        ds.scale = 0.8;
        ds.offset = [100 / 0.8 - layout.pos[0], 160 / 0.8 - layout.pos[1]];
        app.graph.setDirtyCanvas(true, true);
    }""", ids)
    page.wait_for_timeout(1500)
    rect = page.evaluate("""(ids) => {
        const c = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds, th = LiteGraph.NODE_TITLE_HEIGHT;
        let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
        for (const id of [ids.layout, ids.preview]) {
            const n = app.graph.getNodeById(id);
            const [a, b] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th]);
            const [e, f] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
            x0 = Math.min(x0, a); y0 = Math.min(y0, b); x1 = Math.max(x1, e); y1 = Math.max(y1, f);
        }
        return {x: c.left + x0 - 10, y: c.top + y0 - 10, width: x1 - x0 + 20, height: y1 - y0 + 20};
    }""", ids)
    out = artifacts / "readme_layout_and_preview.png"
    page.screenshot(path=str(out), clip=rect)
    assert out.stat().st_size < 300_000
    assert not page.troupe_errors, page.troupe_errors


# What the frontend derives from a custom node's template file name (it reads nothing else: docs/template-browser.md)
CARD_TEXT = """(name) => {
    const card = document.querySelector(`[data-testid='template-workflow-${name}']`);
    if (!card) return null;
    const img = card.querySelector('img');
    return {title: card.querySelector('h3')?.textContent.trim(), description: card.querySelector('p')?.textContent.trim(),
            thumbnail: img && img.naturalWidth > 0 && !img.src.includes('default-template')};  // ours, not the placeholder
}"""


def test_the_template_browser_lists_every_workflow_with_its_thumbnail(page, comfy_server, artifacts):
    """Workflow -> Browse Templates -> Extensions -> ComfyUI-Troupe: one card per example workflow with its thumbnail
    decoded; the card's title is the file name and its description the name or none (frontends 1.32 and 1.49 read no title or
    description for a custom node's templates), and no stray card (an ``index.json`` would show as one)."""
    module = next(m for m, names in comfy_server.get("/workflow_templates").json().items() if "layout_basics" in names)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    try:
        page.get_by_role("dialog").get_by_text(module, exact=True).first.click(timeout=WAIT_MS)
        names = [p.stem for p in WORKFLOWS if isinstance(json.loads(p.read_text()), dict)]  # workflows, not an index
        page.wait_for_selector(f"[data-testid='template-workflow-{names[0]}']", timeout=WAIT_MS)
        page.wait_for_timeout(500)
        page.screenshot(path=str(artifacts / "template_browser.png"))
        cards = {}
        for name in names:  # thumbnails load as their card scrolls into view
            card = page.locator(f"[data-testid='template-workflow-{name}']")
            card.scroll_into_view_if_needed(timeout=WAIT_MS)
            with contextlib.suppress(sync_api.TimeoutError):  # the card's own thumbnail (a blob), or the placeholder
                page.wait_for_function("(n) => document.querySelector(`[data-testid='template-workflow-${n}'] img`)"
                                       "?.src.startsWith('blob:')", arg=name, timeout=10_000)
            cards[name] = page.evaluate(CARD_TEXT, name)
        shown = page.evaluate("() => [...document.querySelectorAll(\"[data-testid^='template-workflow-']\")]"
                              ".map(e => e.dataset.testid.replace('template-workflow-', ''))")
    finally:  # the page is shared by the later browser tests: close the dialog (its X; Escape leaves it open)
        page.locator("[role=dialog] button:has(.pi-times)").first.click(timeout=WAIT_MS)
        page.wait_for_function("() => !document.querySelector(\"[data-testid='template-workflows-content']\")",
                               timeout=WAIT_MS)
    assert sorted(shown) == sorted(names), shown
    for name, card in cards.items():
        # frontend 1.32 shows the name with spaces as the description, 1.49 shows none
        assert card["title"] == name and card["thumbnail"] is True, (name, card)
        assert card["description"] in (name.replace("_", " "), None), (name, card)
