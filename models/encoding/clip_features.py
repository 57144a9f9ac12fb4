"""Hierarchical CLIP features (Sec. 4.2 and B.8 of 004): subject crops and the low/mid/high layers.

Layer numbers are 1-based like the paper (layer 24 of 24 is the last); the hidden state of layer
``k`` is the residual stream after transformer block ``k`` (HF ``hidden_states[k]``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# DynaIP's layers for ViT-L/14-336 (24 blocks): 10, 17, 24 (B.8 of 004). Other depths scale them.
DYNAIP_LAYERS = (10, 17, 24)
DYNAIP_DEPTH = 24
BACKGROUND = 1.0  # the papers train on subject crops on white


def default_layers(depth: int) -> tuple[int, int, int]:
    """Low/mid/high layers for an encoder of ``depth`` blocks: DynaIP's 10/17/24 of 24, scaled by depth."""
    if depth < 3:
        raise ValueError(f"an encoder needs at least 3 blocks for low/mid/high features, got {depth}")
    low, mid = (max(1, round(depth * k / DYNAIP_DEPTH)) for k in DYNAIP_LAYERS[:2])
    mid = max(mid, low + 1)
    return low, min(mid, depth - 1), depth


def check_layers(layers: Sequence[int], depth: int, where: str = "layers") -> tuple[int, ...]:
    """Validate 1-based layer indices against the encoder depth."""
    out = tuple(int(x) for x in layers)
    bad = [x for x in out if not 1 <= x <= depth]
    if bad:
        raise ValueError(f"{where}: layer {bad[0]} does not exist; this encoder has layers 1..{depth}")
    return out


# --------------------------------------------------------------------------- subject crops


def mask_box(mask: torch.Tensor, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Pixel bounding box (top, bottom, left, right; end exclusive) of mask [H, W], None if empty."""
    on = mask >= threshold
    if not bool(on.any()):
        return None
    rows = torch.nonzero(on.any(1)).flatten()
    cols = torch.nonzero(on.any(0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def subject_crop(image: torch.Tensor, mask: torch.Tensor | None = None, background: float = BACKGROUND) -> torch.Tensor:
    """One reference [H, W, 3] -> a square [S, S, 3]: crop to the mask, blank the rest, pad (never stretch)."""
    img = image[..., :3]
    if mask is not None:
        box = mask_box(mask)
        if box is None:
            raise ValueError("the subject mask is empty (no pixel >= 0.5); draw a mask that covers the subject")
        top, bottom, left, right = box
        m = mask[top:bottom, left:right, None].clamp(0, 1).to(img)
        img = img[top:bottom, left:right] * m + background * (1 - m)
    h, w = img.shape[:2]
    side = max(h, w)
    pad_top, pad_left = (side - h) // 2, (side - w) // 2
    chw = img.permute(2, 0, 1)
    chw = F.pad(chw, (pad_left, side - w - pad_left, pad_top, side - h - pad_top), value=background)
    return chw.permute(1, 2, 0)


def square_resize(square: torch.Tensor, size: int) -> torch.Tensor:
    """A square [S, S, 3] resized to [size, size, 3] (bicubic, antialiased)."""
    x = square.permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).clamp(0, 1)


def subject_batch(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], size: int) -> torch.Tensor:
    """All subjects' crops as one IMAGE batch [N, size, size, 3], ready for one encoder forward."""
    return torch.stack([square_resize(subject_crop(i, m), size) for i, m in zip(images, masks)])


# --------------------------------------------------------------------------- layer recording


@contextlib.contextmanager
def record_layers(blocks: nn.ModuleList, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the output of the given 1-based transformer blocks during a forward, with hooks."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(_module, _inputs, output, layer=layer):
            # a copy: ComfyUI's CLIP layers update the residual stream in place (x += attn(x)), so the
            # next block would overwrite the tensor this block returned
            store[layer] = (output[0] if isinstance(output, (tuple, list)) else output).clone()
        handles.append(blocks[layer - 1].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def stack_levels(store: dict[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """The recorded layers as hierarchical features [B, L, G, D]."""
    missing = [l for l in layers if l not in store]
    if missing:
        raise RuntimeError(f"layers {missing} were not reached by the forward pass")
    return torch.stack([store[l] for l in layers], dim=1)
