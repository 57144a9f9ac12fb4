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
  nw: "nwse-resize", se: "nwse-resize", ne: "nesw-resize", sw: "nesw-resize", n: "ns-resize", s: "ns-resize",
  e: "ew-resize", w: "ew-resize", body: "move", none: "crosshair",
};
const ERROR_RED = "#ff6b6b";

/** The labels of the subjects connected to the node (TroupeSubjectList slots in order, empty slots skipped). */
function subjectLabels(node) {
  const linkOf = (id) => (id == null ? null : app.graph?.getLink?.(id) ?? app.graph?.links?.[id] ?? null);
  const upstream = (n, name) => {
    const link = linkOf(n?.inputs?.find((i) => i.name === name)?.link);
    return link ? app.graph.getNodeById(link.origin_id) : null;
  };
  const list = upstream(node, "subjects");
  if (!list) return [];
  const labels = [];
  for (const input of list.inputs || []) {
    if (!/^subject_\d+$/.test(input.name)) continue;
    const subject = upstream(list, input.name);
    if (subject) labels.push(String(findWidget(subject, "label")?.value ?? ""));
  }
  return labels;
}

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

/** Disabled buttons look disabled (the theme's button style does not dim them). */
function setEnabled(b, enabled) {
  b.disabled = !enabled;
  b.style.opacity = enabled ? "1" : "0.35";
  b.style.cursor = enabled ? "pointer" : "default";
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
    this.error = null;  // why the stored value is invalid (shown on the canvas), or null
    this.message = "";  // a short notice (e.g. a refused 9th box), cleared by the next edit
    this.labels = [];  // the connected subjects' labels
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
    // The Vue node renderer does not draw the node on the canvas (no onDraw): check the value and the connected
    // subjects' labels a few times a second there instead (sync is cheap when nothing changed).
    this.timer = setInterval(() => {
      if (globalThis.LiteGraph?.vueNodesMode && this.canvas.isConnected) this.sync();
    }, 300);
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
      clear: button("Clear", "Delete all boxes (also resets an invalid stored value)",
        () => { this.selected = -1; this.commit([]); }),
    };
    this.presets = document.createElement("select");
    this.presets.title = "Set width and height to a common SDXL or FLUX size";
    this.presets.style.cssText = "font-size:11px;max-width:72px;background:var(--comfy-input-bg,#222);" +
      "color:var(--input-text,#ddd);border:1px solid var(--border-color,#555);border-radius:4px";
    this.presets.append(new Option("size…", ""));
    for (const [label, w, h] of G.SIZE_PRESETS) this.presets.append(new Option(label, `${w}x${h}`));
    this.presets.addEventListener("change", () => {
      const [w, h] = this.presets.value.split("x").map(Number);
      this.presets.value = "";
      if (w && h) this.setSize(w, h);
    });
    this.presets.addEventListener("pointerdown", (e) => e.stopPropagation());
    this.info = document.createElement("span");
    // flex-basis 0 and width 0: the text never widens the node (the Vue renderer sizes nodes by content)
    this.info.style.cssText = "flex:1 1 0;width:0;font-size:11px;opacity:0.7;text-align:right;white-space:nowrap;" +
      "overflow:hidden;text-overflow:ellipsis";
    bar.append(...Object.values(this.buttons), this.presets, this.info);
    this.canvas = document.createElement("canvas");
    this.canvas.tabIndex = 0;
    this.canvas.dataset.troupe = "layout-editor";
    this.canvas.style.cssText =
      "display:block;width:100%;min-height:0;outline:none;touch-action:none;cursor:crosshair";
    this.root.style.position = "relative";
    this.root.append(bar, this.canvas);
    const c = this.canvas;
    c.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    c.addEventListener("pointermove", (e) => this.onPointerMove(e));
    c.addEventListener("pointerup", (e) => this.onPointerUp(e));
    c.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    c.addEventListener("contextmenu", (e) => { e.preventDefault(); e.stopPropagation(); });
    c.addEventListener("keydown", (e) => this.onKeyDown(e));
    c.addEventListener("dblclick", (e) => { e.stopPropagation(); this.editLabel(this.hit(this.toImage(e)).index); });
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
    const { boxes, error } = G.readLayout(this.lastValue);
    this.boxes = boxes;
    this.error = error;
    if (this.selected >= this.boxes.length) this.selected = -1;
    this.redraw();
  }

  /** Called on every frame the node draws: catches value, size and aspect changes cheaply. */
  sync() {
    if (this.drag) return;
    if (String(this.valueWidget?.value ?? "") !== this.lastValue) return this.reload();
    const labels = subjectLabels(this.node);
    if (labels.join("\u0000") !== this.labels.join("\u0000") || labels.length !== this.labels.length) {
      this.labels = labels;
      return this.redraw();
    }
    const key = [this.canvas.clientWidth, this.canvas.clientHeight, ...this.size()].join();
    if (key !== this.drawnKey) this.redraw();
  }

  /** Write boxes back into the `boxes` widget: the value the workflow and the prompt carry. */
  commit(boxes) {
    this.boxes = boxes;
    this.error = null;
    this.message = "";
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

  setSize(w, h) {
    for (const [name, v] of [["width", w], ["height", h]]) {
      const widget = findWidget(this.node, name);
      if (!widget) continue;
      widget.value = v;
      widget.callback?.(v);
    }
    app.graph?.setDirtyCanvas(true, true);
    this.redraw();
  }

  nudge(dx, dy) {
    if (this.selected < 0 || this.error) return;
    const [W, H] = this.size();
    this.commit(G.nudgeBox(this.boxes, this.selected, dx, dy, W, H));
  }

  /** Type a box's label in place: an input over the box; Enter or leaving it saves, Escape cancels. */
  editLabel(index) {
    if (index < 0 || index >= this.boxes.length || this.error) return;
    this.selected = index;
    this.redraw();
    const [W, H] = this.size();
    const px = G.toPixels(this.boxes[index], W, H);
    const { s, ox, oy } = this.view;
    const input = document.createElement("input");
    input.type = "text";
    input.value = this.boxes[index].label || this.labels[index] || "";
    input.dataset.troupe = "label-input";
    input.style.cssText = `position:absolute;left:${this.canvas.offsetLeft + ox + px.x0 * s}px;` +
      `top:${this.canvas.offsetTop + oy + px.y0 * s}px;width:${Math.max(60, (px.x1 - px.x0) * s)}px;` +
      "font:bold 12px sans-serif;z-index:10;box-sizing:border-box";
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      input.remove();
      if (!save) return this.redraw();
      const boxes = this.boxes.slice();
      boxes[index] = { ...boxes[index], label: input.value.trim() };
      this.commit(boxes);
    };
    input.addEventListener("keydown", (e) => {
      e.stopPropagation();
      if (e.key === "Enter") finish(true);
      else if (e.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
    input.addEventListener("pointerdown", (e) => e.stopPropagation());
    this.root.append(input);
    input.focus();
    input.select();
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

  /** Boxes as drawn: the stored ones, or the dashed auto layout when none are drawn and subjects are connected. */
  autoBoxes() {
    if (this.boxes.length || this.error || !this.labels.length) return [];
    const [W, H] = this.size();
    return G.defaultBoxes(Math.min(this.labels.length, G.MAX_BOXES), W, H);
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
    if (this.error) return;  // an invalid stored value is shown, not edited: Clear resets it
    const p = this.toImage(e);
    const hit = this.hit(p);
    if (e.button === 2) return hit.index >= 0 && this.remove(hit.index);
    if (e.button !== 0) return;
    const [W, H] = this.size();
    this.selected = hit.index;
    this.message = "";
    this.drag = G.startDrag(this.boxes, hit, p.x, p.y, W, H);
    if (!this.drag && hit.index < 0) {
      this.message = `at most ${G.MAX_BOXES} boxes (one per subject): delete one to draw another`;
    }
    if (this.drag) this.canvas.setPointerCapture(e.pointerId);
    this.redraw();
  }

  onPointerMove(e) {
    if (e.buttons & 4) return app.canvas?.processMouseMove?.(e);
    e.stopPropagation();
    if (this.drag) return this.dragTo(e);
    this.canvas.style.cursor = this.error ? "default" : CURSORS[this.hit(this.toImage(e)).part];
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
    const step = G.GRID * (e.shiftKey ? 8 : 1);
    const actions = {
      ArrowLeft: () => this.nudge(-step, 0),
      ArrowRight: () => this.nudge(step, 0),
      ArrowUp: () => this.nudge(0, -step),
      ArrowDown: () => this.nudge(0, step),
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
    if (this.error) return this.drawError(ctx, W, H);
    this.autoBoxes().forEach((b, i) => this.drawBox(ctx, G.toPixels(b, W, H), i, true));
    this.boxes.forEach((b, i) => this.drawBox(ctx, G.toPixels(b, W, H), i));
  }

  /** The reason a stored value is invalid, in red on the canvas; nothing is drawn clamped. */
  drawError(ctx, W, H) {
    const { s, ox, oy } = this.view;
    ctx.fillStyle = ERROR_RED;
    ctx.font = "bold 12px sans-serif";
    ctx.textAlign = "center";
    const words = `stored layout is invalid: ${this.error}`.split(" ");
    const lines = [];
    let line = "";
    for (const word of words) {
      const next = line ? `${line} ${word}` : word;
      if (ctx.measureText(next).width > W * s - 24 && line) { lines.push(line); line = word; } else line = next;
    }
    lines.push(line);
    const top = oy + (H * s) / 2 - (lines.length * 16) / 2;
    lines.slice(0, 8).forEach((l, i) => ctx.fillText(l, ox + (W * s) / 2, top + i * 16 + 12));
    ctx.fillStyle = "rgba(255,255,255,0.5)";
    ctx.font = "11px sans-serif";
    ctx.fillText("press Clear to start again", ox + (W * s) / 2, top + Math.min(lines.length, 8) * 16 + 26);
    ctx.textAlign = "left";
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
    if (!this.boxes.length && !this.error) {
      ctx.fillStyle = "rgba(255,255,255,0.45)";
      ctx.font = "12px sans-serif";
      ctx.textAlign = "center";
      const auto = this.labels.length > 0;
      ctx.fillText(auto ? "auto layout: draw to override" : "drag to draw one box per subject",
        ox + (W * s) / 2, auto ? oy + 16 : oy + (H * s) / 2);
      ctx.textAlign = "left";
    }
  }

  drawBox(ctx, px, i, auto = false) {
    const { s, ox, oy } = this.view;
    const x = ox + px.x0 * s, y = oy + px.y0 * s, w = (px.x1 - px.x0) * s, h = (px.y1 - px.y0) * s;
    const colour = G.colourOf(i);
    const selected = !auto && i === this.selected;
    if (auto) ctx.setLineDash([6, 4]);
    ctx.globalAlpha = selected ? 0.3 : 0.18;
    ctx.fillStyle = colour;
    ctx.fillRect(x, y, w, h);
    ctx.globalAlpha = 1;
    ctx.strokeStyle = colour;
    ctx.lineWidth = selected ? 3 : 2;
    ctx.strokeRect(x + ctx.lineWidth / 2, y + ctx.lineWidth / 2, w - ctx.lineWidth, h - ctx.lineWidth);
    if (auto) ctx.setLineDash([]);
    if (selected) {
      ctx.setLineDash([4, 3]);
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = 1;
      ctx.strokeRect(x - 1.5, y - 1.5, w + 3, h + 3);
      ctx.setLineDash([]);
      ctx.fillStyle = "#ffffff";
      for (const [hx, hy] of [[x, y], [x + w, y], [x, y + h], [x + w, y + h]]) ctx.fillRect(hx - 4, hy - 4, 8, 8);
    }
    const label = this.labels[i] || px.label;  // connected subjects name their boxes, as in the node's output
    const text = `${i + 1}${label ? " " + label : ""}`;
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
    setEnabled(this.buttons.delete, !none);
    setEnabled(this.buttons.earlier, !none && this.selected !== 0);
    setEnabled(this.buttons.later, !none && this.selected !== this.boxes.length - 1);
    setEnabled(this.buttons.clear, this.boxes.length > 0 || !!this.error);
    this.canvas.dataset.selected = String(this.selected);
    this.canvas.dataset.error = this.error || "";
    this.canvas.dataset.auto = String(this.autoBoxes().length);
    if (this.error || this.message) {
      this.info.textContent = this.error ? "stored layout is invalid" : this.message;
      this.info.title = this.info.textContent;
      this.info.style.color = ERROR_RED;
      this.info.style.opacity = "1";
      return;
    }
    this.info.style.color = "";
    this.info.style.opacity = "0.7";
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
    clearInterval(this.timer);
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
