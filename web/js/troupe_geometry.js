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

const MAX_JSON_CHARS = 100000;

function isNumber(v) {
  return typeof v === "number" && Number.isFinite(v);
}

/** One stored box checked as models/layout/layout.py validate_box does: the reason, or the box. */
function checkBox(item, where) {
  let v = item, label = "";
  if (Array.isArray(item)) {
    if (item.length !== 4) return { error: `${where}: expected 4 numbers [x0, y0, x1, y1]` };
    v = { x0: item[0], y0: item[1], x1: item[2], y1: item[3] };
  } else if (item && typeof item === "object") {
    const missing = ["x0", "y0", "x1", "y1"].filter((k) => !(k in item));
    if (missing.length) return { error: `${where}: missing ${missing.join(", ")}` };
    if ("label" in item && typeof item.label !== "string") return { error: `${where}: label must be a string` };
    label = item.label || "";
  } else {
    return { error: `${where}: expected an object with x0, y0, x1, y1` };
  }
  for (const k of ["x0", "y0", "x1", "y1"]) {
    if (!isNumber(v[k])) return { error: `${where}: ${k} must be a finite number, got ${JSON.stringify(v[k]) ?? String(v[k])}` };
    if (v[k] < 0 || v[k] > 1) return { error: `${where}: ${k}=${v[k]} is out of range [0, 1]` };
  }
  if (!(v.x0 < v.x1 && v.y0 < v.y1)) return { error: `${where}: zero or negative area; need x0 < x1 and y0 < y1` };
  return { box: { x0: v.x0, y0: v.y0, x1: v.x1, y1: v.y1, label } };
}

/**
 * Read a widget value: {boxes, error}. A value Python would refuse gives no boxes and the reason (the editor
 * shows it instead of drawing a clamped or partial layout); never throws.
 */
export function readLayout(text) {
  if (typeof text !== "string" || !text.trim()) return { boxes: [], error: "the value is empty" };
  if (text.length > MAX_JSON_CHARS) return { boxes: [], error: `the value has ${text.length} characters` };
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    return { boxes: [], error: `not valid JSON (${e.message})` };
  }
  if (!data || typeof data !== "object" || Array.isArray(data) || !("boxes" in data)) {
    return { boxes: [], error: 'expected a JSON object with a "boxes" list' };
  }
  if ((data.version ?? LAYOUT_VERSION) !== LAYOUT_VERSION) {
    return { boxes: [], error: `unsupported layout version ${JSON.stringify(data.version)}` };
  }
  if (!Array.isArray(data.boxes)) return { boxes: [], error: '"boxes" must be a list' };
  if (data.boxes.length > MAX_BOXES) {
    return { boxes: [], error: `at most ${MAX_BOXES} boxes (one per subject), got ${data.boxes.length}` };
  }
  const boxes = [];
  for (let i = 0; i < data.boxes.length; i++) {
    const r = checkBox(data.boxes[i], `box ${i + 1}`);
    if (r.error) return { boxes: [], error: r.error };
    boxes.push(r.box);
  }
  return { boxes, error: null };
}

/** The boxes of a valid widget value; an invalid one gives [] (see readLayout for the reason). */
export function parseLayout(text) {
  return readLayout(text).boxes;
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

const inside = (b, x, y) => x >= b.x0 && x <= b.x1 && y >= b.y0 && y <= b.y1;

/**
 * The handle of a box under (x, y): a corner ("nw", "ne", "sw", "se") or an edge ("n", "s", "e", "w") within
 * `radius` pixels *inside* the box (never outside it, so a drag next to a box draws a new box), else null.
 * The zone shrinks on small boxes so that their middle still moves them.
 */
export function handleAt(b, x, y, radius) {
  if (!inside(b, x, y)) return null;
  const rx = Math.min(radius, (b.x1 - b.x0) / 3), ry = Math.min(radius, (b.y1 - b.y0) / 3);
  const ns = y - b.y0 <= ry ? "n" : b.y1 - y <= ry ? "s" : "";
  const we = x - b.x0 <= rx ? "w" : b.x1 - x <= rx ? "e" : "";
  return ns + we || null;
}

/**
 * What lies under pixel (x, y): {index, part} with part a handle of the selected box (corner or edge, see
 * handleAt), "body", or "none" (index -1). Only the selected box has handles; the selected box is tried
 * first, then the boxes from the topmost (last drawn) down. `radius` is the handle size in pixels.
 */
export function hitTest(pixelBoxes, x, y, radius, selected = -1) {
  if (selected >= 0 && selected < pixelBoxes.length) {
    const handle = handleAt(pixelBoxes[selected], x, y, radius);
    if (handle) return { index: selected, part: handle };
    if (inside(pixelBoxes[selected], x, y)) return { index: selected, part: "body" };
  }
  for (let i = pixelBoxes.length - 1; i >= 0; i--) {
    if (inside(pixelBoxes[i], x, y)) return { index: i, part: "body" };
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

/** `orig` with one corner or edge ("n", "e", "sw", ...) dragged by (dx, dy); the opposite side stays, no flipping. */
export function resizeBox(orig, handle, dx, dy, W, H) {
  const b = { ...orig };
  if (handle.includes("w")) b.x0 = Math.min(snap(orig.x0 + dx, W), orig.x1 - MIN_SIZE);
  else if (handle.includes("e")) b.x1 = Math.max(snap(orig.x1 + dx, W), orig.x0 + MIN_SIZE);
  if (handle.includes("n")) b.y0 = Math.min(snap(orig.y0 + dy, H), orig.y1 - MIN_SIZE);
  else if (handle.includes("s")) b.y1 = Math.max(snap(orig.y1 + dy, H), orig.y0 + MIN_SIZE);
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

/** Box `index` moved by (dx, dy) canvas pixels (arrow keys: one grid step, Shift: 8), kept on the canvas. */
export function nudgeBox(boxes, index, dx, dy, W, H) {
  if (index < 0 || index >= boxes.length) return boxes;
  const out = boxes.slice();
  out[index] = toNormalised(moveBox(toPixels(boxes[index], W, H), dx, dy, W, H), W, H);
  return out;
}

/** The auto layout of an empty editor (models/layout/layout.py default_boxes): n equal columns over the middle
 * half of the canvas, on the 8-px grid. Normalised boxes. */
export function defaultBoxes(n, W, H, grid = GRID) {
  const at = (v, size) => Math.round((v * size) / grid) * grid / size;
  const y0 = at(0.25, H), y1 = at(0.75, H);
  return Array.from({ length: n }, (_, i) => ({ x0: at(i / n, W), y0, x1: at((i + 1) / n, W), y1, label: "" }));
}

/** Common generation sizes offered next to width and height: [label, width, height]. */
export const SIZE_PRESETS = [
  ["SDXL 1024×1024", 1024, 1024], ["SDXL 1152×896", 1152, 896], ["SDXL 896×1152", 896, 1152],
  ["SDXL 1216×832", 1216, 832], ["SDXL 832×1216", 832, 1216], ["SDXL 1344×768", 1344, 768],
  ["SDXL 768×1344", 768, 1344], ["FLUX 1024×1024", 1024, 1024], ["FLUX 1360×768", 1360, 768],
  ["FLUX 768×1360", 768, 1360], ["FLUX 1536×640", 1536, 640], ["FLUX 512×512", 512, 512],
];

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
