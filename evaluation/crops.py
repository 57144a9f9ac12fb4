"""Crops the fidelity metrics compare: each layout region of a generated image and each subject's reference(s).

A region is cut at its box (floor of the start edge, ceil of the end edge, as the adapters render boxes on
their grids); a mask region is cut at its mask's bounding box inside the box and every pixel outside the mask
is blanked to white by its coverage, like the reference crops the encoders see. References are cut to their
subject mask on white (``subject_crop``). Both then go through one of two preparations:

- ``pad``: pad to a square with white, then resize (the encoders' own rule: never stretch, never cut);
- ``center``: resize the short side, then cut the centre square (CLIP's and DINO's usual evaluation transform,
  ``clip_preprocess(crop=True)``, OpenCLIP's ``CenterCrop``).

Axis legend: H, W image pixels; S the backbone's square input size; N crops.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models.encoding.clip_features import BACKGROUND, mask_box, square_resize, subject_crop
from ..models.layout.layout import Layout

CROP_MODES: tuple[str, ...] = ("pad", "center")


def check_crop_mode(mode: str) -> str:
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r} is not one of {', '.join(CROP_MODES)}")
    return mode


def box_slice(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel rows and columns (top, bottom, left, right; end exclusive) a normalised box touches, at least one each."""
    x0, y0, x1, y1 = (float(v) for v in box)
    top, left = min(math.floor(y0 * height + 1e-9), height - 1), min(math.floor(x0 * width + 1e-9), width - 1)
    bottom = max(top + 1, min(height, math.ceil(y1 * height - 1e-9)))
    right = max(left + 1, min(width, math.ceil(x1 * width - 1e-9)))
    return top, bottom, left, right


def region_crops(image: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """One crop [h, w, 3] per layout region of an image [H, W, 3] (the layout is scaled to the image's size)."""
    height, width = int(image.shape[0]), int(image.shape[1])
    img = image[..., :3].float()
    masks = layout.masks(height, width) if any(r.mask is not None for r in layout.regions) else None
    crops = []
    for i, region in enumerate(layout.regions):
        if region.mask is None:
            top, bottom, left, right = box_slice(region.box, height, width)
            crops.append(img[top:bottom, left:right])
            continue
        if mask_box(masks[i]) is None:
            raise ValueError(f"region {i + 1}: its mask covers no pixel of the {height}x{width} image "
                             "(no value >= 0.5); draw a larger mask")
        crops.append(mask_cut(img, masks[i]))
    return crops


def mask_cut(image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A reference [H, W, 3] cut to its mask's bounding box, the background blanked to white (unpadded)."""
    img = image[..., :3].float()
    if mask is None:
        return img
    box = mask_box(mask)
    if box is None:
        raise ValueError("the subject mask is empty (no pixel >= 0.5); draw a mask that covers the subject")
    top, bottom, left, right = box
    alpha = mask[top:bottom, left:right, None].clamp(0, 1).to(img)
    return img[top:bottom, left:right] * alpha + BACKGROUND * (1 - alpha)


def reference_crops(images: torch.Tensor, masks: torch.Tensor | None) -> list[torch.Tensor]:
    """Every view of one subject ([B, H, W, 3], masks [B, H, W] or None) cut to its mask on white."""
    return [mask_cut(images[v], None if masks is None else masks[v]) for v in range(images.shape[0])]


def center_square(crop: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side of [h, w, 3] to ``size`` (bicubic, antialiased), then cut the centre square."""
    h, w = crop.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    x = crop.permute(2, 0, 1)[None]
    if new != (h, w):
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return x[0, :, top:top + size, left:left + size].permute(1, 2, 0).clamp(0, 1)


def prepare(crop: torch.Tensor, size: int, mode: str = "pad") -> torch.Tensor:
    """One crop [h, w, 3] -> the backbone's square input [size, size, 3] in [0, 1] (see the module docstring)."""
    if check_crop_mode(mode) == "pad":
        return square_resize(subject_crop(crop), size)
    return center_square(crop, size)


def prepare_batch(crops: Sequence[torch.Tensor], size: int, mode: str = "pad") -> torch.Tensor:
    """Every crop prepared, as one batch [N, size, size, 3] for one backbone forward."""
    return torch.stack([prepare(c, size, mode) for c in crops])
