"""Picture of the reference branch's joint attention mask (Eq. 6 of 002): rows queries, columns keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout.layout import PALETTE
from ..layout.preview import hex_rgb
from .branch import MaskSpec, allowed_matrix

TEXT_GREY = (0.6, 0.6, 0.6)
SEPARATOR = (1.0, 0.85, 0.0)


def draw_attention_mask(spec: MaskSpec, size: int = 768) -> torch.Tensor:
    """IMAGE [1, size, size, 3]: grey = text, white = image, subject colours = references, black = blocked;
    yellow lines between text | image | reference 1 | reference 2 ..."""
    allowed = allowed_matrix(spec).float()
    segments = spec.segments()
    colours = torch.ones(spec.length, 3)
    colours[: spec.n_txt] = torch.tensor(TEXT_GREY)
    for r, (_, s, e) in enumerate(segments[2:]):
        colours[s:e] = torch.tensor(hex_rgb(PALETTE[spec.ref_subject[r] % len(PALETTE)]), dtype=torch.float32) / 255
    img = allowed[..., None] * colours[None, :, :]
    img = F.adaptive_avg_pool2d(img.permute(2, 0, 1)[None], (min(size, spec.length),) * 2)
    img = F.interpolate(img, size=(size, size), mode="nearest")[0]
    line = torch.tensor(SEPARATOR)[:, None, None]
    for _, s, _e in segments[1:]:
        p = round(s * size / spec.length)
        img[:, max(0, p - 1):p + 1, :] = line
        img[:, :, max(0, p - 1):p + 1] = line
    return img.permute(1, 2, 0)[None].clamp(0, 1)
