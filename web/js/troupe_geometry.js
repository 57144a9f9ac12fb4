// Box-editor geometry for TroupeLayout: pure functions, no DOM.
//
// The widget value is JSON {"version": 1, "boxes": [{x0, y0, x1, y1, label?}]} with
// coordinates normalised to [0, 1] (read by models/layout.py parse_layout_json). Editing
// happens in canvas pixels (the node's width x height): edges snap to the 8-px latent grid,
// the canvas border is always a valid edge, and a box is at least MIN_SIZE px each way.

export const GRID = 8;
export const MIN_SIZE = 8;
export const MAX_BOXES = 8;
export const LAYOUT_VERSION = 1;
// Same order as PALETTE in models/layout.py: box i is subject i.
export const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
export const CORNERS = ["nw", "ne", "sw", "se"];

export function clamp(v, lo, hi) {
  return Math.min(hi, Math.max(lo, v));
}

/** Nearest grid line to `v` within [0, limit]; `limit` itself counts as a grid line. */
export function snap(v, limit, grid = GRID) {
  const onGrid = Math.round(v / grid) * grid;
  const best = Math.abs(limit - v) < Math.abs(onGrid - v) ? limit : onGrid;
  return clamp(best, 0, limit);
}

export function colourOf(index) {
  return PALETTE[index % PALETTE.length];
}

// --------------------------------------------------------------------------- units

/** Normalised box -> pixel box on a W x H canvas. */
export function toPixels(box, W, H) {
  return { x0: box.x0 * W, y0: box.y0 * H, x1: box.x1 * W, y1: box.y1 * H, label: box.label || "" };
}

const round6 = (v) => Math.round(v * 1e6) / 1e6;

/** Pixel box -> normalised box (6 decimals, like dump_layout_json). */
export function toNormalised(px, W, H) {
  return {
    x0: round6(clamp(px.x0 / W, 0, 1)), y0: round6(clamp(px.y0 / H, 0, 1)),
    x1: round6(clamp(px.x1 / W, 0, 1)), y1: round6(clamp(px.y1 / H, 0, 1)),
    label: px.label || "",
  };
}

// --------------------------------------------------------------------------- JSON

function readBox(item) {
  const v = Array.isArray(item) ? { x0: item[0], y0: item[1], x1: item[2], y1: item[3] } : item;
  if (!v || typeof v !== "object") return null;
  const nums = [v.x0, v.y0, v.x1, v.y1].map(Number);
  if (!nums.every(Number.isFinite)) return null;
  const [x0, y0, x1, y1] = nums.map((n) => clamp(n, 0, 1));
  if (!(x0 < x1 && y0 < y1)) return null;
  return { x0, y0, x1, y1, label: typeof v.label === "string" ? v.label : "" };
}

/** The boxes of a widget value; anything unreadable is dropped (bad JSON -> []), never throws. */
export function parseLayout(text) {
  let data;
  try {
    data = typeof text === "string" ? JSON.parse(text) : text;
  } catch {
    return [];
  }
  const items = data && Array.isArray(data.boxes) ? data.boxes : [];
  return items.map(readBox).filter(Boolean).slice(0, MAX_BOXES);
}

/** The widget value for a list of normalised boxes (inverse of parseLayout). */
export function serialiseLayout(boxes) {
  const items = boxes.map((b) => {
    const item = { x0: round6(b.x0), y0: round6(b.y0), x1: round6(b.x1), y1: round6(b.y1) };
    if (b.label) item.label = b.label;
    return item;
  });
  return JSON.stringify({ version: LAYOUT_VERSION, boxes: items });
}

// --------------------------------------------------------------------------- hit-testing

function hitBox(b, x, y, radius) {
  for (const corner of CORNERS) {
    const cx = corner.endsWith("w") ? b.x0 : b.x1;
    const cy = corner.startsWith("n") ? b.y0 : b.y1;
    if (Math.abs(x - cx) <= radius && Math.abs(y - cy) <= radius) return corner;
  }
  return x >= b.x0 && x <= b.x1 && y >= b.y0 && y <= b.y1 ? "body" : null;
}

/**
 * What lies under pixel (x, y): {index, part} with part a corner ("nw", "ne", "sw", "se"),
 * "body", or "none" (index -1). The preferred (selected) box is tried first, then the
 * boxes from the topmost (last drawn) down. `radius` is the corner grab size in pixels.
 */
export function hitTest(pixelBoxes, x, y, radius, preferred = -1) {
  const order = pixelBoxes.map((_, i) => pixelBoxes.length - 1 - i);
  if (preferred >= 0 && preferred < pixelBoxes.length) order.unshift(preferred);
  for (const i of order) {
    const part = hitBox(pixelBoxes[i], x, y, radius);
    if (part) return { index: i, part };
  }
  return { index: -1, part: "none" };
}

// --------------------------------------------------------------------------- drags

/** The pixel box spanned by two points, snapped; null while smaller than MIN_SIZE. */
export function spanBox(ax, ay, bx, by, W, H) {
  const x0 = snap(Math.min(ax, bx), W), x1 = snap(Math.max(ax, bx), W);
  const y0 = snap(Math.min(ay, by), H), y1 = snap(Math.max(ay, by), H);
  return x1 - x0 >= MIN_SIZE && y1 - y0 >= MIN_SIZE ? { x0, y0, x1, y1, label: "" } : null;
}

/** `orig` shifted by (dx, dy): its top-left corner snaps, its size is kept, it stays on the canvas. */
export function moveBox(orig, dx, dy, W, H) {
  const w = orig.x1 - orig.x0, h = orig.y1 - orig.y0;
  const x0 = clamp(snap(orig.x0 + dx, W), 0, Math.max(0, W - w));
  const y0 = clamp(snap(orig.y0 + dy, H), 0, Math.max(0, H - h));
  return { x0, y0, x1: x0 + w, y1: y0 + h, label: orig.label || "" };
}

/** `orig` with one corner dragged by (dx, dy); the opposite corner stays, no flipping. */
export function resizeBox(orig, corner, dx, dy, W, H) {
  const b = { ...orig };
  if (corner.endsWith("w")) b.x0 = Math.min(snap(orig.x0 + dx, W), orig.x1 - MIN_SIZE);
  else b.x1 = Math.max(snap(orig.x1 + dx, W), orig.x0 + MIN_SIZE);
  if (corner.startsWith("n")) b.y0 = Math.min(snap(orig.y0 + dy, H), orig.y1 - MIN_SIZE);
  else b.y1 = Math.max(snap(orig.y1 + dy, H), orig.y0 + MIN_SIZE);
  b.x0 = Math.max(0, b.x0); b.y0 = Math.max(0, b.y0);
  b.x1 = Math.min(W, b.x1); b.y1 = Math.min(H, b.y1);
  return b;
}

/**
 * Start a drag at pixel (x, y) given a hit-test result: "draw" on empty space (refused when
 * MAX_BOXES exist), "move" on a body, "resize" on a corner.
 */
export function startDrag(boxes, hit, x, y, W, H) {
  if (hit.index < 0) {
    return boxes.length < MAX_BOXES ? { mode: "draw", index: boxes.length, x, y, base: boxes } : null;
  }
  const orig = toPixels(boxes[hit.index], W, H);
  const mode = hit.part === "body" ? "move" : "resize";
  return { mode, index: hit.index, corner: hit.part, x, y, orig, base: boxes };
}

/** The normalised box list while a drag is at pixel (x, y); only the dragged box changes. */
export function applyDrag(drag, x, y, W, H) {
  const boxes = drag.base.slice();
  const dx = x - drag.x, dy = y - drag.y;
  let px;
  if (drag.mode === "draw") px = spanBox(drag.x, drag.y, x, y, W, H);
  else if (drag.mode === "move") px = moveBox(drag.orig, dx, dy, W, H);
  else px = resizeBox(drag.orig, drag.corner, dx, dy, W, H);
  if (px) boxes[drag.index] = toNormalised(px, W, H);
  return boxes;
}

// --------------------------------------------------------------------------- list edits

export function deleteBox(boxes, index) {
  return boxes.filter((_, i) => i !== index);
}

/** Move box `index` by `delta` places (-1 earlier, +1 later); returns {boxes, index}. */
export function reorderBox(boxes, index, delta) {
  const to = index + delta;
  if (index < 0 || index >= boxes.length || to < 0 || to >= boxes.length) return { boxes, index };
  const out = boxes.slice();
  [out[index], out[to]] = [out[to], out[index]];
  return { boxes: out, index: to };
}
