"""TROUPE_LAYOUT: a canvas and one region per subject, rendered as masks at any resolution.

Coordinates are normalised to the canvas: x grows right, y grows down, a box is
``(x0, y0, x1, y1)`` with ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``.

Rendering policy (documented in the README):
- ``coverage`` (default): each pixel holds the exact fraction of its area inside
  the box, so a box edge that falls inside a pixel gives a fractional value and
  the mask's sum equals the box area in pixels.
- ``binary``: a pixel is on when any part of it is inside the box (floor of the
  start edge, ceil of the end edge), the rule MS-Diffusion uses on latent grids.
- ``center``: a pixel is on when its centre is inside the box.

Overlaps: ``share`` keeps every region's own mask (overlapping pixels belong to
all of them); ``front`` lets a later region occlude earlier ones
(``m_i *= prod_{j>i} (1 - m_j)``); ``normalize`` divides by the total where
regions add up to more than 1, so the masks never sum past 1.

Feather: a Gaussian blur whose sigma is given in canvas pixels and scaled to the
target resolution, applied before the overlap policy.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]
EdgeMode = Literal["coverage", "binary", "center"]
OverlapPolicy = Literal["share", "front", "normalize"]

EDGE_MODES: tuple[str, ...] = ("coverage", "binary", "center")
OVERLAP_POLICIES: tuple[str, ...] = ("share", "front", "normalize")
MAX_REGIONS = 8
MAX_JSON_CHARS = 100_000  # 8 boxes with long labels fit many times over; a bigger value is not a layout
PIXEL_SNAP = 0.01  # canvas pixels: further than the 6-decimal storage rounding can move an edge
LAYOUT_JSON_VERSION = 1
# Colours shared with the box editor (web/js/troupe_geometry.js): subject i uses PALETTE[i].
PALETTE: tuple[str, ...] = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
)


class LayoutError(ValueError):
    """A layout value that cannot be used; the message says what to change."""


# --------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class Region:
    """One subject's place on the canvas: a box, a mask [H, W] in [0, 1], or both (intersected)."""

    box: Box | None = None
    mask: torch.Tensor | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.box is None and self.mask is None:
            raise LayoutError("a region needs a box or a mask")
        if self.box is not None:
            object.__setattr__(self, "box", validate_box(self.box, where="region box"))
        if self.mask is not None:
            if self.mask.ndim != 2:
                raise LayoutError(f"a region mask must be [H, W], got shape {tuple(self.mask.shape)}")
            object.__setattr__(self, "mask", self.mask.detach().float().clamp(0.0, 1.0).cpu())

    def bbox(self) -> Box:
        """The region's extent: its box, or the bounding box of its mask."""
        if self.box is not None:
            return self.box
        return mask_bbox(self.mask)


@dataclass(frozen=True)
class Layout:
    """Canvas size in pixels and an ordered list of regions (region i belongs to subject i)."""

    width: int
    height: int
    regions: tuple[Region, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name, value in (("width", self.width), ("height", self.height)):
            if not isinstance(value, int) or value < 8:
                raise LayoutError(f"layout {name} must be an integer >= 8 pixels, got {value!r}")
        object.__setattr__(self, "regions", tuple(self.regions))
        if len(self.regions) > MAX_REGIONS:
            raise LayoutError(f"a layout holds at most {MAX_REGIONS} regions, got {len(self.regions)}")

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def boxes(self) -> list[Box]:
        return [r.bbox() for r in self.regions]

    def with_labels(self, labels: Sequence[str]) -> Layout:
        """A copy whose regions carry the given labels (extra labels are ignored)."""
        regions = tuple(
            Region(box=r.box, mask=r.mask, label=labels[i] if i < len(labels) else r.label)
            for i, r in enumerate(self.regions)
        )
        return Layout(self.width, self.height, regions)

    def masks(
        self,
        height: int,
        width: int,
        *,
        edge: EdgeMode = "coverage",
        overlap: OverlapPolicy = "share",
        feather: float = 0.0,
    ) -> torch.Tensor:
        """Render every region as a mask [N, height, width] in [0, 1]."""
        if height < 1 or width < 1:
            raise LayoutError(f"mask size must be positive, got {height}x{width}")
        if not self.regions:
            return torch.zeros(0, height, width)
        out = torch.stack([render_region(r, height, width, edge=edge) for r in self.regions])
        if feather > 0:
            sigma = feather * 0.5 * (height / self.height + width / self.width)
            out = gaussian_blur(out, sigma)
        return resolve_overlaps(out, overlap)

    def latent_masks(self, downscale: int = 8, **kw) -> torch.Tensor:
        """Masks at the latent grid of this canvas (``ceil(size / downscale)``, ComfyUI's rounding)."""
        return self.masks(math.ceil(self.height / downscale), math.ceil(self.width / downscale), **kw)

    def attention_masks(
        self, latent_height: int, latent_width: int, factors: Sequence[int] = (1, 2, 4), **kw
    ) -> dict[int, torch.Tensor]:
        """Masks flattened to tokens [N, h*w] for each attention resolution ``ceil(latent / f)``."""
        result = {}
        for f in factors:
            h, w = math.ceil(latent_height / f), math.ceil(latent_width / f)
            result[f] = self.masks(h, w, **kw).flatten(1)
        return result

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> str:
        """The editor's JSON value for this layout's boxes (mask-only regions use their bbox)."""
        return dump_layout_json(self.boxes, [r.label for r in self.regions])


# --------------------------------------------------------------------------- rendering


def axis_coverage(lo: float, hi: float, n: int, edge: EdgeMode) -> torch.Tensor:
    """Per-pixel coverage [n] of the interval [lo, hi] (normalised) along one axis of n pixels."""
    a, b = lo * n, hi * n
    idx = torch.arange(n, dtype=torch.float64)
    if edge == "coverage":
        # the edges in float64: torch.tensor(float) is float32, which moved an edge by up to 2e-6 of a pixel
        hi, lo = torch.tensor(b, dtype=torch.float64), torch.tensor(a, dtype=torch.float64)
        cov = (torch.minimum(idx + 1, hi) - torch.maximum(idx, lo)).clamp(0, 1)
    elif edge == "binary":
        start, end = math.floor(a + 1e-9), math.ceil(b - 1e-9)
        cov = ((idx >= start) & (idx < end)).double()
    elif edge == "center":
        centre = idx + 0.5
        cov = ((centre >= a) & (centre < b)).double()
    else:
        raise LayoutError(f"edge mode must be one of {EDGE_MODES}, got {edge!r}")
    return cov.float()


def render_box(box: Box, height: int, width: int, edge: EdgeMode = "coverage") -> torch.Tensor:
    """A box as a mask [height, width]: the outer product of the two axis coverages."""
    x0, y0, x1, y1 = box
    return axis_coverage(y0, y1, height, edge)[:, None] * axis_coverage(x0, x1, width, edge)[None, :]


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a mask [H, W]: area averaging when shrinking, bilinear when growing."""
    if tuple(mask.shape) == (height, width):
        return mask.clone()
    m = mask[None, None]
    if height <= mask.shape[0] and width <= mask.shape[1]:
        m = F.adaptive_avg_pool2d(m, (height, width))
    else:
        m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return m[0, 0].clamp(0.0, 1.0)


def render_region(region: Region, height: int, width: int, edge: EdgeMode = "coverage") -> torch.Tensor:
    """One region as a mask [height, width]; box and mask together intersect (multiply)."""
    out = torch.ones(height, width)
    if region.box is not None:
        out = out * render_box(region.box, height, width, edge)
    if region.mask is not None:
        m = resize_mask(region.mask, height, width)
        if edge != "coverage":
            m = (m >= 0.5).float()
        out = out * m
    return out


def gaussian_blur(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of masks [N, H, W] with zero padding (mass leaving the canvas is lost)."""
    if sigma <= 0:
        return masks
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    m = masks[:, None]
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0)), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius)), k.view(1, 1, -1, 1))
    return m[:, 0].clamp(0.0, 1.0)


def resolve_overlaps(masks: torch.Tensor, policy: OverlapPolicy) -> torch.Tensor:
    """Apply the overlap policy to masks [N, H, W] (see the module docstring)."""
    if policy == "share":
        return masks
    if policy == "front":
        out = masks.clone()
        cover = torch.zeros_like(masks[0])
        for i in range(masks.shape[0] - 1, -1, -1):
            out[i] = masks[i] * (1.0 - cover)
            cover = cover + out[i]
        return out.clamp(0.0, 1.0)
    if policy == "normalize":
        total = masks.sum(0, keepdim=True)
        return torch.where(total > 1.0, masks / total.clamp_min(1e-8), masks)
    raise LayoutError(f"overlap policy must be one of {OVERLAP_POLICIES}, got {policy!r}")


def mask_bbox(mask: torch.Tensor, threshold: float = 0.5) -> Box:
    """The normalised bounding box of the pixels of mask [H, W] at or above threshold."""
    on = mask >= threshold
    if not bool(on.any()):
        raise LayoutError("the mask is empty (no pixel >= 0.5): draw or pick a mask that covers the subject")
    h, w = mask.shape
    rows = torch.nonzero(on.any(1)).flatten()
    cols = torch.nonzero(on.any(0)).flatten()
    return (
        cols[0].item() / w, rows[0].item() / h, (cols[-1].item() + 1) / w, (rows[-1].item() + 1) / h,
    )


# --------------------------------------------------------------------------- JSON value


def validate_box(box: Sequence, where: str = "box") -> Box:
    """Check one normalised box and return it as a float tuple."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise LayoutError(f"{where}: expected 4 numbers [x0, y0, x1, y1], got {box!r}")
    vals = []
    for name, v in zip(("x0", "y0", "x1", "y1"), box):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LayoutError(f"{where}: {name} must be a finite number, got {v!r}")
        if not 0.0 <= v <= 1.0:
            raise LayoutError(
                f"{where}: {name}={v} is out of range; coordinates are fractions of the canvas in [0, 1]"
            )
        vals.append(float(v))
    x0, y0, x1, y1 = vals
    if x1 <= x0 or y1 <= y0:
        raise LayoutError(
            f"{where}: zero or negative area (x0={x0}, x1={x1}, y0={y0}, y1={y1}); need x0 < x1 and y0 < y1"
        )
    return (x0, y0, x1, y1)


def parse_layout_json(text: str) -> tuple[list[Box], list[str]]:
    """Parse the editor's JSON value ``{"version": 1, "boxes": [{"x0":..,"y0":..,"x1":..,"y1":..,"label":..}]}``."""
    if not isinstance(text, str) or not text.strip():
        raise LayoutError('the boxes value is empty; expected JSON like {"version": 1, "boxes": []}')
    if len(text) > MAX_JSON_CHARS:
        raise LayoutError(f"the boxes value has {len(text)} characters; a layout of {MAX_REGIONS} boxes needs under "
                          f"{MAX_JSON_CHARS}: redraw the boxes")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"the boxes value is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise LayoutError("the boxes value nests lists or objects too deeply to be a layout; redraw the boxes") from None
    if not isinstance(data, dict) or "boxes" not in data:
        raise LayoutError('the boxes value must be a JSON object with a "boxes" list')
    version = data.get("version", LAYOUT_JSON_VERSION)
    if version != LAYOUT_JSON_VERSION:
        raise LayoutError(f"unsupported layout version {version!r}; this pack reads version {LAYOUT_JSON_VERSION}")
    items = data["boxes"]
    if not isinstance(items, list):
        raise LayoutError(f'"boxes" must be a list, got {type(items).__name__}')
    if len(items) > MAX_REGIONS:
        raise LayoutError(f"at most {MAX_REGIONS} boxes (one per subject), got {len(items)}; delete some")
    boxes, labels = [], []
    for i, item in enumerate(items):
        where = f"box {i + 1}"
        if isinstance(item, dict):
            missing = [k for k in ("x0", "y0", "x1", "y1") if k not in item]
            if missing:
                raise LayoutError(f"{where}: missing {', '.join(missing)}")
            label = item.get("label", "")
            if not isinstance(label, str):
                raise LayoutError(f"{where}: label must be a string, got {label!r}")
            boxes.append(validate_box([item["x0"], item["y0"], item["x1"], item["y1"]], where))
            labels.append(label)
        elif isinstance(item, (list, tuple)):
            boxes.append(validate_box(item, where))
            labels.append("")
        else:
            raise LayoutError(f"{where}: expected an object with x0, y0, x1, y1, got {item!r}")
    return boxes, labels


def dump_layout_json(boxes: Sequence[Box], labels: Sequence[str] | None = None) -> str:
    """The editor's JSON value for a list of boxes (inverse of ``parse_layout_json``)."""
    labels = list(labels or [])
    items = []
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = validate_box(b, f"box {i + 1}")
        item = {"x0": round(x0, 6), "y0": round(y0, 6), "x1": round(x1, 6), "y1": round(y1, 6)}
        if i < len(labels) and labels[i]:
            item["label"] = labels[i]
        items.append(item)
    return json.dumps({"version": LAYOUT_JSON_VERSION, "boxes": items})


def snap_to_pixels(box: Box, width: int, height: int) -> Box:
    """Edges within ``PIXEL_SNAP`` canvas pixels of a pixel edge move onto it.

    The editor draws on canvas pixels but stores 6 decimals: 72 px of 1024 is stored as 0.070313, i.e.
    72.0005 px, which the ``binary`` edge rule (floor start, ceil end) would round up by a whole latent row.
    Rounding to 6 decimals moves an edge by at most 5e-7 * size < 0.01 px for canvases up to 16384 px, so
    genuinely sub-pixel edges (from masks or hand-written JSON) are kept.
    """
    out = []
    for v, size in zip(box, (width, height, width, height)):
        px = v * size
        out.append(round(px) / size if abs(px - round(px)) < PIXEL_SNAP else v)
    return (out[0], out[1], out[2], out[3])


def default_boxes(count: int, width: int, height: int, grid: int = 8) -> list[Box]:
    """The auto layout of an empty editor: ``count`` equal columns over the middle half of the canvas (rows 1/4 to
    3/4), edges on the ``grid``-pixel latent grid; the editor draws the same boxes dashed."""
    def snap(v: float, size: int) -> float:
        return math.floor(v * size / grid + 0.5) * grid / size  # half up, as the editor's Math.round

    y0, y1 = snap(0.25, height), snap(0.75, height)
    return [(snap(i / count, width), y0, snap((i + 1) / count, width), y1) for i in range(count)]


def layout_from_json(text: str, width: int, height: int) -> Layout:
    """Build a layout from the editor's JSON value and the canvas size (edges snapped to canvas pixels)."""
    boxes, labels = parse_layout_json(text)
    return Layout(width, height, tuple(Region(box=snap_to_pixels(b, width, height), label=l)
                                       for b, l in zip(boxes, labels)))


def layout_from_masks(masks: torch.Tensor, width: int | None = None, height: int | None = None) -> Layout:
    """One region per mask of a batch [N, H, W]; each region keeps its mask and its bounding box."""
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise LayoutError(f"expected a MASK batch [N, H, W] with N >= 1, got shape {tuple(masks.shape)}")
    regions = []
    for i in range(masks.shape[0]):
        m = masks[i].float().clamp(0, 1)
        try:
            box = mask_bbox(m)
        except LayoutError:
            raise LayoutError(f"mask {i + 1} of the batch is empty (no pixel >= 0.5)") from None
        regions.append(Region(box=box, mask=m))
    return Layout(int(width or masks.shape[2]), int(height or masks.shape[1]), tuple(regions))
