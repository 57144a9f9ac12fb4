"""Pictures of a layout: boxes, numbers, colours and labels drawn over an image or a blank canvas."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .layout import PALETTE, Layout

BLANK_GREY = 0.12


def hex_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def box_pixels(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rectangle (left, top, right, bottom; right/bottom inclusive) of a normalised box."""
    x0, y0, x1, y1 = box
    left, top = int(round(x0 * width)), int(round(y0 * height))
    right, bottom = int(round(x1 * width)) - 1, int(round(y1 * height)) - 1
    return left, top, max(left, right), max(top, bottom)


def draw_layout(
    layout: Layout,
    background: torch.Tensor | None = None,
    *,
    line_width: int = 0,
    fill_alpha: float = 0.18,
) -> torch.Tensor:
    """IMAGE [1, H, W, 3] of the layout; the background is resized to the canvas when given."""
    w, h = layout.width, layout.height
    if background is None:
        base = Image.new("RGB", (w, h), tuple(int(BLANK_GREY * 255) for _ in range(3)))
    else:
        arr = (background[0, ..., :3].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        base = Image.fromarray(arr).convert("RGB")
        if base.size != (w, h):
            base = base.resize((w, h), Image.Resampling.LANCZOS)
    lw = line_width or max(2, round(min(w, h) / 170))
    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = _font(max(12, round(min(w, h) / 22)))
    for i, region in enumerate(layout.regions):
        rgb = hex_rgb(PALETTE[i % len(PALETTE)])
        if region.mask is not None:
            m = layout.masks(h, w)[i].numpy()
            tint = np.zeros((h, w, 4), dtype=np.uint8)
            tint[..., :3] = rgb
            tint[..., 3] = (m * fill_alpha * 255).astype(np.uint8)
            overlay = Image.alpha_composite(overlay, Image.fromarray(tint, "RGBA"))
            draw = ImageDraw.Draw(overlay)
        rect = box_pixels(region.bbox(), w, h)
        if region.mask is None:
            draw.rectangle(rect, fill=rgb + (int(fill_alpha * 255),))
        draw.rectangle(rect, outline=rgb + (255,), width=lw)
        text = f"{i + 1}" + (f" {region.label}" if region.label else "")
        tb = draw.textbbox((0, 0), text, font=font)
        pad = max(2, lw)
        tag = (rect[0], rect[1], rect[0] + tb[2] - tb[0] + 2 * pad, rect[1] + tb[3] - tb[1] + 2 * pad)
        draw.rectangle(tag, fill=rgb + (255,))
        draw.text((rect[0] + pad - tb[0], rect[1] + pad - tb[1]), text, fill=(255, 255, 255, 255), font=font)
    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    return torch.from_numpy(np.asarray(out).astype(np.float32) / 255.0)[None]


def draw_masks(masks: torch.Tensor) -> torch.Tensor:
    """IMAGE [1, H, W, 3] with each mask [N, H, W] tinted in its subject colour over black."""
    n, h, w = masks.shape
    out = torch.zeros(h, w, 3)
    for i in range(n):
        rgb = torch.tensor(hex_rgb(PALETTE[i % len(PALETTE)]), dtype=torch.float32) / 255.0
        out = torch.maximum(out, masks[i, :, :, None].float() * rgb)
    return out[None]
