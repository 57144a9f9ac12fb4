"""Attention maps drawn over the decoded image: one heat-map per subject and the argmax-subject map (plain torch)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..models.layout.layout import PALETTE
from .heatmap import RAMP, _font, hex_rgb

IMAGE_SHARE = 0.4  # how much of the decoded image shows under the colours


def ramp_colours(t: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] [...] to RGB in [0, 1] [..., 3] on the heat-map ramp (viridis anchors, linear in between)."""
    anchors = torch.tensor(RAMP, dtype=torch.float32) / 255.0
    x = t.clamp(0, 1) * (len(RAMP) - 1)
    i = x.floor().long().clamp(max=len(RAMP) - 2)
    f = (x - i)[..., None]
    return anchors[i] * (1 - f) + anchors[i + 1] * f


def subject_colours(n: int) -> torch.Tensor:
    """Subject i's layout colour [n, 3] in [0, 1] (PALETTE, as the box editor draws it)."""
    return torch.tensor([hex_rgb(PALETTE[i % len(PALETTE)]) for i in range(n)], dtype=torch.float32) / 255.0


def argmax_subject(maps: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Index of the subject with the most mass per pixel [B, H, W]; -1 where no subject gets more than ``floor``."""
    best, index = maps.max(dim=1)
    return torch.where(best > floor, index, torch.full_like(index, -1))


def render_attention_maps(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """IMAGE [B * (N + 1), H, W, 3]: per image, subject 1..N's mass on the ramp over it, then the argmax map.

    ``image`` [B, H, W, 3] in [0, 1]; ``maps`` [B, N, H, W] mean attention mass per subject (``attention_record``).
    Each image's heat-maps share one scale (its largest mass), so a subject's leak reads against the others.
    """
    b, h, w, _ = image.shape
    maps = maps.float()
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps, size=(h, w), mode="nearest")
    n = maps.shape[1]
    base = image.float().cpu()
    scale = maps.flatten(1).amax(1).clamp(min=1e-12).view(b, 1, 1, 1)
    heat = ramp_colours(maps / scale)  # [B, N, H, W, 3]
    colours = torch.cat([torch.full((1, 3), 0.0), subject_colours(n)])  # index 0: no subject (black)
    winner = colours[argmax_subject(maps) + 1]  # [B, H, W, 3]
    frames = []
    for i in range(b):
        frames += [IMAGE_SHARE * base[i] + (1 - IMAGE_SHARE) * heat[i, j] for j in range(n)]
        frames.append(IMAGE_SHARE * base[i] + (1 - IMAGE_SHARE) * winner[i])
    return torch.stack(frames).clamp(0, 1)


def label_frames(frames: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """Each image's frames titled ``labels`` then "argmax" in their top-left corner (white on black)."""
    titles = [*labels, "argmax"]
    out = frames.clone()
    for i, frame in enumerate(out):
        img = Image.new("RGB", (frame.shape[1], frame.shape[0]))
        draw = ImageDraw.Draw(img)
        text = titles[i % len(titles)]
        font = _font(max(10, frame.shape[0] // 16))
        box = draw.textbbox((3, 2), text, font=font)
        draw.text((3, 2), text, fill=(255, 255, 255), font=font)
        w, h = min(box[2] + 3, frame.shape[1]), min(box[3] + 2, frame.shape[0])
        frame[:h, :w] = torch.from_numpy(np.asarray(img, dtype=np.float32)[:h, :w] / 255.0)  # only the title box
    return out
