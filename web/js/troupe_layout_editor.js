// Troupe.LayoutEditor: a box editor on the TroupeLayout node.
//
// The node's `boxes` STRING (JSON, validated in Python) stays the one source of truth: it is
// hidden but still serialised into the workflow and the API prompt. A <canvas> DOM widget
// (serialize: false) draws the boxes at the aspect ratio of width x height and edits them:
// drag on empty space to draw, drag a box to move it, drag a corner to resize, right-click or
// Delete/Backspace to delete, [ and ] (or the buttons) to reorder. Every edit writes the JSON
// back; onConfigure and external changes of the value are read back into the editor.
import { app } from "../../../scripts/app.js";
import * as G from "./troupe_geometry.js";

const NODE_TYPE = "TroupeLayout";
const TOOLBAR_PX = 26;
const CANVAS_MIN_PX = 160;
const PAD_PX = 6;
const HANDLE_PX = 7;
const CURSORS = {
  nw: "nwse-resize", se: "nwse-resize", ne: "nesw-resize", sw: "nesw-resize", body: "move", none: "crosshair",
};

const findWidget = (node, name) => node.widgets?.find((w) => w.name === name);

function chain(object, key, after) {
  const before = object[key];
  object[key] = function (...args) {
    const result = before?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

/** Hide a widget in the UI (and take no room) while it stays in widgets_values and the prompt. */
function hideWidget(w) {
  w.hidden = true;
  w.options ??= {};
  w.options.hidden = true;  // the Vue node renderer reads options.hidden
  if (w.computeLayoutSize) w.computeLayoutSize = () => ({ minHeight: 0, maxHeight: 0, minWidth: 0 });
  if (w.computeSize) w.computeSize = () => [0, -4];
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.title = title;
  b.style.cssText = "font-size:11px;padding:1px 7px;border-radius:4px;cursor:pointer;" +
    "background:var(--comfy-input-bg,#222);color:var(--input-text,#ddd);border:1px solid var(--border-color,#555)";
  b.addEventListener("click", (e) => { e.stopPropagation(); onClick(); });
  return b;
}

class LayoutEditor {
  constructor(node) {
    this.node = node;
    this.valueWidget = findWidget(node, "boxes");
    this.boxes = [];
    this.selected = -1;
    this.drag = null;
    this.lastValue = null;
    this.drawnKey = "";
    this.view = { s: 1, ox: 0, oy: 0 };
    if (this.valueWidget) hideWidget(this.valueWidget);
    this.buildDom();
    this.widget = node.addDOMWidget("layout_editor", "troupe_layout_editor", this.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => TOOLBAR_PX + CANVAS_MIN_PX,
      onDraw: () => this.sync(),
    });
    this.widget.serialize = false;  // keep it out of widgets_values (positional)
    for (const name of ["width", "height"]) {
      const w = findWidget(node, name);
      if (w) chain(w, "callback", () => this.sync());
    }
    this.resizeObserver = new ResizeObserver(() => this.sync());
    this.resizeObserver.observe(this.canvas);
    this.reload();
  }

  // ------------------------------------------------------------------ DOM

  buildDom() {
    this.root = document.createElement("div");
    this.root.style.cssText =
      "display:flex;flex-direction:column;gap:4px;box-sizing:border-box;min-width:0;user-select:none";
    const bar = document.createElement("div");
    bar.style.cssText = `display:flex;gap:4px;align-items:center;height:${TOOLBAR_PX - 4}px;flex:none`;
    this.buttons = {
      delete: button("Delete", "Delete the selected box (Delete key, or right-click a box)",
        () => this.remove(this.selected)),
      earlier: button("Earlier", "Move the selected box one place earlier: box i is subject i ([ key)",
        () => this.reorder(-1)),
      later: button("Later", "Move the selected box one place later (] key)", () => this.reorder(1)),
      clear: button("Clear", "Delete all boxes", () => { this.selected = -1; this.commit([]); }),
    };
    this.info = document.createElement("span");
    // flex-basis 0 and width 0: the text never widens the node (the Vue renderer sizes nodes by content)
    this.info.style.cssText = "flex:1 1 0;width:0;font-size:11px;opacity:0.7;text-align:right;white-space:nowrap;" +
      "overflow:hidden;text-overflow:ellipsis";
    bar.append(...Object.values(this.buttons), this.info);
    this.canvas = document.createElement("canvas");
    this.canvas.tabIndex = 0;
    this.canvas.dataset.troupe = "layout-editor";
    this.canvas.style.cssText =
      "display:block;width:100%;min-height:0;outline:none;touch-action:none;cursor:crosshair";
    this.root.append(bar, this.canvas);
    const c = this.canvas;
    c.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    c.addEventListener("pointermove", (e) => this.onPointerMove(e));
    c.addEventListener("pointerup", (e) => this.onPointerUp(e));
    c.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    c.addEventListener("contextmenu", (e) => { e.preventDefault(); e.stopPropagation(); });
    c.addEventListener("keydown", (e) => this.onKeyDown(e));
    c.addEventListener("wheel", (e) => { e.preventDefault(); app.canvas?.processMouseWheel?.(e); });
  }

  // ------------------------------------------------------------------ state

  size() {
    const W = Number(findWidget(this.node, "width")?.value) || 1024;
    const H = Number(findWidget(this.node, "height")?.value) || 1024;
    return [Math.max(8, W), Math.max(8, H)];
  }

  /** Re-read the JSON value (after loading a workflow, undo, or any outside change). */
  reload() {
    this.lastValue = String(this.valueWidget?.value ?? "");
    this.boxes = G.parseLayout(this.lastValue);
    if (this.selected >= this.boxes.length) this.selected = -1;
    this.redraw();
  }

  /** Called on every frame the node draws: catches value, size and aspect changes cheaply. */
  sync() {
    if (this.drag) return;
    if (String(this.valueWidget?.value ?? "") !== this.lastValue) return this.reload();
    const key = [this.canvas.clientWidth, this.canvas.clientHeight, ...this.size()].join();
    if (key !== this.drawnKey) this.redraw();
  }

  /** Write boxes back into the `boxes` widget: the value the workflow and the prompt carry. */
  commit(boxes) {
    this.boxes = boxes;
    if (this.selected >= boxes.length) this.selected = -1;
    const json = G.serialiseLayout(boxes);
    const w = this.valueWidget;
    if (w && w.value !== json) {
      w.value = json;  // a DOM widget's setter also calls w.callback
      if (!("element" in w)) w.callback?.(json);
    }
    this.lastValue = String(w?.value ?? json);
    app.graph?.setDirtyCanvas(true, true);
    // One undo step per edit (the tracker otherwise checks on mouseup, before a button's click).
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
    this.redraw();
  }

  remove(index) {
    if (index < 0 || index >= this.boxes.length) return;
    this.selected = -1;
    this.commit(G.deleteBox(this.boxes, index));
  }

  reorder(delta) {
    if (this.selected < 0) return;
    const { boxes, index } = G.reorderBox(this.boxes, this.selected, delta);
    this.selected = index;
    this.commit(boxes);
  }

  // ------------------------------------------------------------------ coordinates

  /** Where the W x H image lies in the canvas element (CSS px): scale s and offset, letterboxed. */
  computeView() {
    const cw = this.canvas.clientWidth, ch = this.canvas.clientHeight;
    const [W, H] = this.size();
    const s = Math.max(1e-6, Math.min((cw - 2 * PAD_PX) / W, (ch - 2 * PAD_PX) / H));
    this.view = { s, ox: (cw - W * s) / 2, oy: (ch - H * s) / 2 };
    return this.view;
  }

  /** Canvas pixel (image space) under a pointer event, clamped to the canvas. */
  toImage(e) {
    const r = this.canvas.getBoundingClientRect();
    const zoom = r.width / (this.canvas.clientWidth || r.width);  // the graph scales DOM widgets
    const { s, ox, oy } = this.computeView();  // fresh: the element may have resized mid-drag
    const [W, H] = this.size();
    const x = ((e.clientX - r.left) / zoom - ox) / s;
    const y = ((e.clientY - r.top) / zoom - oy) / s;
    return { x: G.clamp(x, 0, W), y: G.clamp(y, 0, H) };
  }

  /** Page (client) coordinates of an image pixel: used by the browser tests to aim the mouse. */
  toClient(x, y) {
    const r = this.canvas.getBoundingClientRect();
    const zoom = r.width / (this.canvas.clientWidth || r.width);
    const { s, ox, oy } = this.computeView();
    return { x: r.left + (ox + x * s) * zoom, y: r.top + (oy + y * s) * zoom };
  }

  hit(p) {
    const [W, H] = this.size();
    const pixels = this.boxes.map((b) => G.toPixels(b, W, H));
    return G.hitTest(pixels, p.x, p.y, HANDLE_PX / this.view.s, this.selected);
  }

  // ------------------------------------------------------------------ pointer and keys

  onPointerDown(e) {
    if (e.button === 1) return app.canvas?.processMouseDown?.(e);  // middle button pans the graph
    e.stopPropagation();  // no preventDefault: the compatibility mouseup lets the undo tracker see the edit
    this.canvas.focus({ preventScroll: true });
    const p = this.toImage(e);
    const hit = this.hit(p);
    if (e.button === 2) return hit.index >= 0 && this.remove(hit.index);
    if (e.button !== 0) return;
    const [W, H] = this.size();
    this.selected = hit.index;
    this.drag = G.startDrag(this.boxes, hit, p.x, p.y, W, H);
    if (this.drag) this.canvas.setPointerCapture(e.pointerId);
    this.redraw();
  }

  onPointerMove(e) {
    if (e.buttons & 4) return app.canvas?.processMouseMove?.(e);
    e.stopPropagation();
    if (this.drag) return this.dragTo(e);
    this.canvas.style.cursor = CURSORS[this.hit(this.toImage(e)).part];
  }

  dragTo(e) {
    const p = this.toImage(e);
    const [W, H] = this.size();
    this.boxes = G.applyDrag(this.drag, p.x, p.y, W, H);
    if (this.drag.mode === "draw" && this.boxes.length > this.drag.base.length) this.selected = this.drag.index;
    this.redraw();
  }

  onPointerUp(e) {
    if (e.button === 1) return app.canvas?.processMouseUp?.(e);
    e.stopPropagation();
    if (!this.drag) return;
    if (e.type === "pointerup") this.dragTo(e);  // moves may be coalesced: the release point is final
    if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
    const changed = G.serialiseLayout(this.boxes) !== G.serialiseLayout(this.drag.base);
    this.drag = null;
    if (changed) this.commit(this.boxes);
    else this.redraw();
  }

  onKeyDown(e) {
    const actions = {
      Delete: () => this.remove(this.selected),
      Backspace: () => this.remove(this.selected),
      "[": () => this.reorder(-1),
      "]": () => this.reorder(1),
      Escape: () => { this.selected = -1; this.redraw(); },
    };
    const action = actions[e.key];
    if (!action) return;
    e.preventDefault();
    e.stopPropagation();  // keep the graph from deleting the node itself
    action();
  }

  // ------------------------------------------------------------------ drawing

  /**
   * Classic nodes give the DOM widget a fixed box: the canvas fills it and letterboxes the
   * image. The Vue node renderer sizes widgets by their content: the canvas takes the aspect.
   */
  layoutMode(W, H) {
    const vue = !!globalThis.LiteGraph?.vueNodesMode;
    const key = `${vue}|${W}x${H}`;
    if (key === this.modeKey) return;
    this.modeKey = key;
    Object.assign(this.canvas.style, vue
      ? { flex: "none", height: "auto", aspectRatio: `${W} / ${H}`, maxHeight: "640px" }
      : { flex: "1 1 0", height: "0", aspectRatio: "auto", maxHeight: "none" });
  }

  redraw() {
    const c = this.canvas;
    const [W, H] = this.size();
    this.layoutMode(W, H);
    const cw = c.clientWidth, ch = c.clientHeight;
    this.updateToolbar(W, H);
    if (!cw || !ch) return;
    this.drawnKey = [cw, ch, W, H].join();
    const dpr = window.devicePixelRatio || 1;
    if (c.width !== Math.round(cw * dpr) || c.height !== Math.round(ch * dpr)) {
      c.width = Math.round(cw * dpr);
      c.height = Math.round(ch * dpr);
    }
    this.computeView();
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cw, ch);
    this.drawCanvas(ctx, W, H);
    this.boxes.forEach((b, i) => this.drawBox(ctx, G.toPixels(b, W, H), i));
  }

  drawCanvas(ctx, W, H) {
    const { s, ox, oy } = this.view;
    ctx.fillStyle = "#1f1f1f";  // the preview's blank grey (0.12)
    ctx.fillRect(ox, oy, W * s, H * s);
    let step = G.GRID;  // grid hint: the coarsest multiple of 8 px that is at least 12 screen px apart
    while (step * s < 12) step *= 2;
    ctx.strokeStyle = "rgba(255,255,255,0.06)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let x = step; x < W; x += step) {
      const X = Math.round(ox + x * s) + 0.5;
      ctx.moveTo(X, oy);
      ctx.lineTo(X, oy + H * s);
    }
    for (let y = step; y < H; y += step) {
      const Y = Math.round(oy + y * s) + 0.5;
      ctx.moveTo(ox, Y);
      ctx.lineTo(ox + W * s, Y);
    }
    ctx.stroke();
    ctx.strokeStyle = "rgba(255,255,255,0.35)";
    ctx.strokeRect(ox + 0.5, oy + 0.5, W * s - 1, H * s - 1);
    if (!this.boxes.length) {
      ctx.fillStyle = "rgba(255,255,255,0.45)";
      ctx.font = "12px sans-serif";
      ctx.textAlign = "center";
      ctx.fillText("drag to draw one box per subject", ox + (W * s) / 2, oy + (H * s) / 2);
      ctx.textAlign = "left";
    }
  }

  drawBox(ctx, px, i) {
    const { s, ox, oy } = this.view;
    const x = ox + px.x0 * s, y = oy + px.y0 * s, w = (px.x1 - px.x0) * s, h = (px.y1 - px.y0) * s;
    const colour = G.colourOf(i);
    const selected = i === this.selected;
    ctx.globalAlpha = selected ? 0.3 : 0.18;
    ctx.fillStyle = colour;
    ctx.fillRect(x, y, w, h);
    ctx.globalAlpha = 1;
    ctx.strokeStyle = colour;
    ctx.lineWidth = selected ? 3 : 2;
    ctx.strokeRect(x + ctx.lineWidth / 2, y + ctx.lineWidth / 2, w - ctx.lineWidth, h - ctx.lineWidth);
    if (selected) {
      ctx.setLineDash([4, 3]);
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = 1;
      ctx.strokeRect(x - 1.5, y - 1.5, w + 3, h + 3);
      ctx.setLineDash([]);
      ctx.fillStyle = "#ffffff";
      for (const [hx, hy] of [[x, y], [x + w, y], [x, y + h], [x + w, y + h]]) ctx.fillRect(hx - 4, hy - 4, 8, 8);
    }
    const text = `${i + 1}${px.label ? " " + px.label : ""}`;
    ctx.font = "bold 12px sans-serif";
    const tw = Math.min(ctx.measureText(text).width + 8, Math.max(w, 16));
    ctx.fillStyle = colour;
    ctx.fillRect(x, y, tw, 17);
    ctx.fillStyle = "#ffffff";
    ctx.textBaseline = "middle";
    ctx.fillText(text, x + 4, y + 9, tw - 6);
    ctx.textBaseline = "alphabetic";
  }

  updateToolbar(W, H) {
    const none = this.selected < 0;
    this.buttons.delete.disabled = none;
    this.buttons.earlier.disabled = none || this.selected === 0;
    this.buttons.later.disabled = none || this.selected === this.boxes.length - 1;
    this.buttons.clear.disabled = !this.boxes.length;
    this.canvas.dataset.selected = String(this.selected);
    let text = `${this.boxes.length}/${G.MAX_BOXES} · ${W}×${H}`;
    if (!none && this.boxes[this.selected]) {
      const b = G.toPixels(this.boxes[this.selected], W, H);
      const [x, y, w, h] = [b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0].map(Math.round);
      text = `box ${this.selected + 1}: ${x},${y} ${w}×${h} · ${text}`;
    }
    this.info.textContent = text;
  }

  dispose() {
    this.resizeObserver?.disconnect();
  }
}

app.registerExtension({
  name: "Troupe.LayoutEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const proto = nodeType.prototype;
    chain(proto, "onNodeCreated", function () {
      this.troupeEditor = new LayoutEditor(this);
      const [w, h] = this.computeSize();
      this.setSize([Math.max(w, 360), Math.max(h, 420)]);
    });
    chain(proto, "onConfigure", function () {
      this.troupeEditor?.reload();
    });
    chain(proto, "onRemoved", function () {
      this.troupeEditor?.dispose();
    });
  },
});
