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
    left, top = round(x0 * width), round(y0 * height)
    right, bottom = round(x1 * width) - 1, round(y1 * height) - 1
    return left, top, max(left, right), max(top, bottom)


def draw_layout(
    layout: Layout,
    background: torch.Tensor | None = None,
    *,
    line_width: int = 0,
    fill_alpha: float = 0.18,
    thumbnails: list[torch.Tensor] | None = None,
    thumbnail_alpha: float = 0.6,
) -> torch.Tensor:
    """IMAGE [1, H, W, 3] of the layout; the background is resized to the canvas when given.

    ``thumbnails`` (one IMAGE per region) are fitted inside their boxes, aspect kept, so the
    artist sees which reference goes where.
    """
    w, h = layout.width, layout.height
    if background is None:
        base = Image.new("RGB", (w, h), (round(BLANK_GREY * 255),) * 3)
    else:
        arr = (background[0, ..., :3].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        base = Image.fromarray(arr).convert("RGB")
        if base.size != (w, h):
            base = base.resize((w, h), Image.Resampling.LANCZOS)
    lw = line_width or max(2, round(min(w, h) / 170))
    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    font = _font(max(12, round(min(w, h) / 22)))
    region_masks = layout.masks(h, w) if any(r.mask is not None for r in layout.regions) else None
    for i, region in enumerate(layout.regions):
        rgb = hex_rgb(PALETTE[i % len(PALETTE)])
        rect = box_pixels(region.bbox(), w, h)
        tint = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        if region.mask is not None:
            m = region_masks[i].numpy()
            arr = np.zeros((h, w, 4), dtype=np.uint8)
            arr[..., :3] = rgb
            arr[..., 3] = (m * fill_alpha * 255).astype(np.uint8)
            tint = Image.fromarray(arr, "RGBA")
        else:
            ImageDraw.Draw(tint).rectangle(rect, fill=rgb + (int(fill_alpha * 255),))
        overlay = Image.alpha_composite(overlay, tint)
        if thumbnails is not None and i < len(thumbnails):
            overlay = Image.alpha_composite(overlay, _thumbnail_layer(thumbnails[i], rect, (w, h), thumbnail_alpha))
        draw = ImageDraw.Draw(overlay)
        draw.rectangle(rect, outline=rgb + (255,), width=lw)
        text = f"{i + 1}" + (f" {region.label}" if region.label else "")
        tb = draw.textbbox((0, 0), text, font=font)
        pad = max(2, lw)
        tag = (rect[0], rect[1], rect[0] + tb[2] - tb[0] + 2 * pad, rect[1] + tb[3] - tb[1] + 2 * pad)
        draw.rectangle(tag, fill=rgb + (255,))
        draw.text((rect[0] + pad - tb[0], rect[1] + pad - tb[1]), text, fill=(255, 255, 255, 255), font=font)
    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    return torch.from_numpy(np.asarray(out).astype(np.float32) / 255.0)[None]


def _thumbnail_layer(image: torch.Tensor, rect: tuple[int, int, int, int], size: tuple[int, int],
                     alpha: float) -> Image.Image:
    """An RGBA layer of the canvas size with ``image`` fitted (contained, centred) in ``rect``."""
    arr = (image[0, ..., :3].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    thumb = Image.fromarray(arr).convert("RGB")
    bw, bh = rect[2] - rect[0] + 1, rect[3] - rect[1] + 1
    scale = min(bw / thumb.width, bh / thumb.height)
    tw, th = max(1, int(thumb.width * scale)), max(1, int(thumb.height * scale))
    thumb = thumb.resize((tw, th), Image.Resampling.LANCZOS).convert("RGBA")
    thumb.putalpha(int(alpha * 255))
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste(thumb, (rect[0] + (bw - tw) // 2, rect[1] + (bh - th) // 2))
    return layer


def draw_masks(masks: torch.Tensor) -> torch.Tensor:
    """IMAGE [1, H, W, 3] with each mask [N, H, W] tinted in its subject colour over black."""
    n, h, w = masks.shape
    out = torch.zeros(h, w, 3)
    for i in range(n):
        rgb = torch.tensor(hex_rgb(PALETTE[i % len(PALETTE)]), dtype=torch.float32) / 255.0
        out = torch.maximum(out, masks[i, :, :, None].float() * rgb)
    return out[None]
