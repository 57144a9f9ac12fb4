"""Hierarchical CLIP features (Sec. 4.2 and B.8 of 004): subject crops and the low/mid/high layers.

Layer numbers are 1-based like the paper (layer 24 of 24 is the last); the hidden state of layer
``k`` is the residual stream after transformer block ``k`` (HF ``hidden_states[k]``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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


PAD, CENTRE_CROP, STRETCH = "pad", "centre crop", "stretch"
CROPS: tuple[str, ...] = (PAD, CENTRE_CROP, STRETCH)


def masked_crop(image: torch.Tensor, mask: torch.Tensor | None = None, background: float = BACKGROUND) -> torch.Tensor:
    """One reference [H, W, 3] cropped to its mask, the rest blanked to ``background``; not squared yet."""
    img = image[..., :3]
    if mask is not None:
        box = mask_box(mask)
        if box is None:
            raise ValueError("the subject mask is empty (no pixel >= 0.5); draw a mask that covers the subject")
        top, bottom, left, right = box
        m = mask[top:bottom, left:right, None].clamp(0, 1).to(img)
        img = img[top:bottom, left:right] * m + background * (1 - m)
    return img


def pad_square(img: torch.Tensor, background: float = BACKGROUND) -> torch.Tensor:
    """[H, W, 3] -> [S, S, 3], S = max(H, W): centred on a ``background`` square (never stretched)."""
    h, w = img.shape[:2]
    side = max(h, w)
    pad_top, pad_left = (side - h) // 2, (side - w) // 2
    chw = F.pad(img.permute(2, 0, 1), (pad_left, side - w - pad_left, pad_top, side - h - pad_top), value=background)
    return chw.permute(1, 2, 0)


def subject_crop(image: torch.Tensor, mask: torch.Tensor | None = None, background: float = BACKGROUND) -> torch.Tensor:
    """One reference [H, W, 3] -> a square [S, S, 3]: crop to the mask, blank the rest, pad (never stretch)."""
    return pad_square(masked_crop(image, mask, background), background)


def resize(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H, W, 3] resized to [height, width, 3] (bicubic, antialiased, as ComfyUI's clip_preprocess)."""
    if tuple(img.shape[:2]) == (height, width):
        return img
    x = F.interpolate(img.permute(2, 0, 1)[None], size=(height, width), mode="bicubic", align_corners=False,
                      antialias=True)
    return x[0].permute(1, 2, 0).clamp(0, 1)


def centre_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's image processor geometry: the short side resized to ``size``, then the centre ``size`` square."""
    h, w = img.shape[:2]
    if h <= w:
        rh, rw = size, int(size * w / h)
    else:
        rh, rw = int(size * h / w), size
    img = resize(img, rh, rw)
    top, left = (rh - size) // 2, (rw - size) // 2
    return img[top:top + size, left:left + size]


def square_resize(square: torch.Tensor, size: int) -> torch.Tensor:
    """A square [S, S, 3] resized to [size, size, 3] (bicubic, antialiased)."""
    return resize(square, size, size)


def crop_to_square(img: torch.Tensor, size: int, crop: str = PAD) -> torch.Tensor:
    """A subject crop [H, W, 3] made square [size, size, 3]: padded, centre-cropped or stretched."""
    if crop == PAD:
        return resize(pad_square(img), size, size)
    if crop == CENTRE_CROP:
        return centre_crop(img, size)
    if crop == STRETCH:
        return resize(img, size, size)
    raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")


AS_TRAINED = "as trained"
CROP_CHOICES: tuple[str, ...] = (AS_TRAINED, *CROPS)

# How each adapter family's official code made its reference crops (README, "Golden parity"):
#   IP-Adapter (tencent-ailab) and XLabs (x-flux): CLIPImageProcessor, short side resized, centre crop;
#   MS-Diffusion: every reference resized to a square (resize_ref=True / inference resize((512, 512))), then
#   the processor (a no-op crop on a square); InstantX: SigLIP's processor resizes to 384 x 384 (no crop);
#   DynaIP (troupe-flux, ViT-L/14-336) and R^3 files: the pack's own training, white padding.
ENCODER_CROPS: dict[str, tuple[str, ...]] = {
    "siglip": (STRETCH,),  # InstantX FLUX
    "vit-bigG": (STRETCH, CENTRE_CROP),  # MS-Diffusion / R^3 (penultimate); IP-Adapter SDXL base (embeds)
    "vit-H": (CENTRE_CROP,),  # IP-Adapter Plus and base ViT-H
    "vit-L": (CENTRE_CROP,),  # XLabs FLUX
    "vit-L-336": (PAD,),  # DynaIP / troupe-flux
}


def encoder_kind(depth: int, width: int, image_size: int, siglip: bool) -> str:
    """Which published encoder a CLIP vision model is (by depth, width, input size); "other" if none."""
    if siglip:
        return "siglip"
    if depth == 48:
        return "vit-bigG"
    if depth == 32:
        return "vit-H"
    if depth == 24 and width == 1024:
        return "vit-L-336" if image_size == 336 else "vit-L"
    return "other"


def crops_to_encode(choice: str, kind: str) -> tuple[str, ...]:
    """The crop geometries one encoding makes: the chosen one, or every family's own for this encoder."""
    if choice == AS_TRAINED:
        return ENCODER_CROPS.get(kind, (PAD,))
    if choice not in CROPS:
        raise ValueError(f"crop must be one of {CROP_CHOICES}, got {choice!r}")
    return (choice,)


def subject_batch(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], size: int,
                  crop: str = PAD) -> torch.Tensor:
    """All subjects' crops as one IMAGE batch [N, size, size, 3], ready for one encoder forward."""
    return torch.stack([crop_to_square(masked_crop(i, m), size, crop) for i, m in zip(images, masks)])


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
