"""DINO features for representational alignment (Sec. 3.4 of 000: DINOv3; Sec. 3.3 of 001: DINOv2).

Per subject the CLS token of its crop (Eq. 8 of 000, L_cross of 001); for a whole reference image
its patch tokens (Eq. 9 of 000, L_self of 001). Axis legend: N images, R register tokens, P = h*w
patch tokens on an (h, w) grid, D model width. Token layout of every DINO ViT here:
``[CLS | R registers | P patches]`` (R = 0 for DINOv2, 4 for DINOv3).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip_features import square_resize, subject_crop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV3_TRANSFORMERS = (4, 56)  # DINOv3ViTModel first shipped in transformers 4.56
# config.json model_type -> transformers class name
HF_DINO_CLASSES = {
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "dinov3_vit": "DINOv3ViTModel",
}


class DinoModelError(ValueError):
    """A DINO model that cannot be used; the message says what to install or load instead."""


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class DinoTokens:
    """Last-layer tokens of N images: CLS [N, D], registers [N, R, D], patches [N, P, D] on ``grid`` (h, w)."""

    cls: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]

    def patch_map(self) -> torch.Tensor:
        """The patch tokens as a feature map [N, h, w, D] (row-major, like the ViT's patch order)."""
        return self.patches.unflatten(1, self.grid)

    def shapes(self) -> str:
        h, w = self.grid
        return (f"cls {list(self.cls.shape)}, registers {list(self.registers.shape)}, "
                f"patches {list(self.patches.shape)}, grid {h}x{w}")


@dataclass(frozen=True)
class DinoFeatures(DinoTokens):
    """TROUPE_DINO_FEATURES: the subjects' crop tokens (one row per subject), plus a whole image's tokens or None."""

    model: str = ""
    labels: tuple[str, ...] = ()
    image: DinoTokens | None = None

    @property
    def num_subjects(self) -> int:
        return int(self.cls.shape[0])

    @property
    def width(self) -> int:
        return int(self.cls.shape[-1])

    def summary(self) -> str:
        lines = [f"model: {self.model}", f"subjects ({', '.join(self.labels)}): {self.shapes()}"]
        if self.image is not None:
            lines.append(f"image: {self.image.shapes()}")
        return "\n".join(lines)


def split_tokens(hidden: torch.Tensor, num_registers: int, grid: tuple[int, int]) -> DinoTokens:
    """Split a last hidden state [N, 1 + R + P, D] into CLS, register and patch tokens."""
    h, w = grid
    expected = 1 + num_registers + h * w
    if hidden.ndim != 3 or hidden.shape[1] != expected:
        raise RuntimeError(f"the DINO model returned {tuple(hidden.shape)} tokens; expected [N, {expected}, D] "
                           f"(CLS + {num_registers} registers + {h}x{w} patches)")
    return DinoTokens(cls=hidden[:, 0], registers=hidden[:, 1:1 + num_registers],
                      patches=hidden[:, 1 + num_registers:], grid=(h, w))


# --------------------------------------------------------------------------- preprocessing


def snap_to_patch(size: int, patch: int) -> int:
    """The nearest multiple of the patch size (at least one patch)."""
    return max(patch, round(size / patch) * patch)


def image_size(height: int, width: int, resolution: int, patch: int) -> tuple[int, int]:
    """A whole image's input size: about resolution^2 pixels, aspect kept, both sides multiples of the patch."""
    scale = resolution / math.sqrt(height * width)
    return snap_to_patch(round(height * scale), patch), snap_to_patch(round(width * scale), patch)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An IMAGE batch [N, H, W, 3] resized to [N, h, w, 3] (bicubic, antialiased; stretches if the aspect differs)."""
    x = image[..., :3].movedim(-1, 1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.movedim(1, -1).clamp(0, 1)


def normalise(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """IMAGE [N, H, W, 3] in [0, 1] -> pixel values [N, 3, H, W] standardised per channel (ImageNet for DINO)."""
    x = batch.movedim(-1, 1).float()
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# --------------------------------------------------------------------------- encoder


class HFDino(nn.Module):
    """A transformers DINO model behind a plain module whose forward returns the last hidden state."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixel_values).last_hidden_state


@dataclass(frozen=True)
class DinoEncoder:
    """A DINO ViT and how to feed it: patch size, register count, normalisation, a fixed input size if any."""

    model: nn.Module
    name: str
    patch_size: int
    num_registers: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    fixed_size: int | None = None  # ComfyUI's DINOv2 has no position interpolation: 518 px only
    device: torch.device | str = "cpu"

    def square_size(self, resolution: int) -> int:
        return self.fixed_size or snap_to_patch(resolution, self.patch_size)

    def tokens(self, batch: torch.Tensor) -> DinoTokens:
        """One batched forward of IMAGE [N, H, W, 3] (sides multiples of the patch) -> its last-layer tokens."""
        h, w = batch.shape[1] // self.patch_size, batch.shape[2] // self.patch_size
        pixels = normalise(batch.to(self.device), self.mean, self.std)
        with torch.inference_mode():
            out = self.model(pixel_values=pixels)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        # a copy made outside inference mode is a normal tensor: later losses may save it for backward
        return split_tokens(hidden.float().cpu().clone(), self.num_registers, (h, w))


def encode_dino(encoder: DinoEncoder, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None],
                labels: Sequence[str], image: torch.Tensor | None = None, resolution: int = 224) -> DinoFeatures:
    """Every subject crop [H, W, 3] (mask-cropped on white, padded square) in one forward; a whole IMAGE in another."""
    side = encoder.square_size(resolution)
    crops = torch.stack([square_resize(subject_crop(i, m), side) for i, m in zip(images, masks)])
    subjects = encoder.tokens(crops)
    whole = None
    if image is not None:
        if image.shape[0] not in (1, len(images)):
            raise ValueError(f"input 'image': a batch of {image.shape[0]} images does not match the "
                             f"{len(images)} subjects; give one whole image, or one per subject in subject order")
        if encoder.fixed_size:
            size = (encoder.fixed_size, encoder.fixed_size)
        else:
            size = image_size(image.shape[1], image.shape[2], side, encoder.patch_size)
        whole = encoder.tokens(resize(image, size))
    name = encoder.name if encoder.fixed_size else f"{encoder.name}, {side} px"
    return DinoFeatures(cls=subjects.cls, registers=subjects.registers, patches=subjects.patches, grid=subjects.grid,
                        model=name, labels=tuple(labels), image=whole)


# --------------------------------------------------------------------------- HF transformers folders


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dino_model_type(folder: str) -> str:
    """The config.json model_type of a local HF folder; a clear error when it is not a DINO ViT."""
    model_type = str(read_json(os.path.join(folder, "config.json")).get("model_type", ""))
    if model_type not in HF_DINO_CLASSES:
        hint = (" (DINOv3 ConvNeXt has no CLS/patch tokens; use a DINOv3 ViT)" if model_type.startswith("dinov3")
                else "")
        raise DinoModelError(f"{os.path.basename(folder)} is not a DINO ViT: its config.json says model_type "
                             f"{model_type!r}{hint}; expected one of {', '.join(HF_DINO_CLASSES)}")
    return model_type


def import_transformers(model_type: str):
    """transformers, checked for the version the model type needs (DINOv3 needs >= 4.56)."""
    try:
        import transformers
    except ImportError:
        raise DinoModelError("DINO models from models/dino need the transformers package: "
                             "pip install 'transformers>=4.56' (or load DINOv2 with Load CLIP Vision)") from None
    if model_type == "dinov3_vit":
        version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
        if version < DINOV3_TRANSFORMERS or not hasattr(transformers, "DINOv3ViTModel"):
            raise DinoModelError(f"DINOv3 needs transformers >= 4.56 (DINOv3ViTModel); this ComfyUI has "
                                 f"transformers {transformers.__version__}: pip install -U 'transformers>=4.56'")
    return transformers


def unreadable_weights(folder: str, error: BaseException) -> str:
    """Why a DINO folder's weights did not load, in words: a pickle that would run code, or a damaged file.

    transformers answers both with advice about TensorFlow checkpoints (``from_tf=True``), which misleads here;
    the folder's files are read again with the pack's safe reader to tell which it is.
    """
    from ..adapter_file import AdapterFormatError, read_state_dict

    name = os.path.basename(os.path.normpath(folder))
    for file in sorted(os.listdir(folder)):
        if file.endswith((".safetensors", ".bin", ".pt", ".pth")):
            try:
                read_state_dict(os.path.join(folder, file))
            except AdapterFormatError as e:
                return f"the DINO folder '{name}': {e}"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return (f"the DINO folder '{name}' could not be loaded ({first}); it needs config.json and model.safetensors "
            "from the model's page")


def load_hf_dino(folder: str, device: torch.device | str = "cpu") -> DinoEncoder:
    """A local DINOv2 / DINOv2-with-registers / DINOv3 ViT folder (config.json + weights), float32, eval mode."""
    model_type = dino_model_type(folder)
    transformers = import_transformers(model_type)
    model_class = getattr(transformers, HF_DINO_CLASSES[model_type])
    from safetensors import SafetensorError

    try:
        hf_model = model_class.from_pretrained(folder, local_files_only=True).float().eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise DinoModelError(unreadable_weights(folder, e)) from None
    config = hf_model.config
    processor = os.path.join(folder, "preprocessor_config.json")
    pre = read_json(processor) if os.path.isfile(processor) else {}
    return DinoEncoder(model=HFDino(hf_model), name=f"{os.path.basename(os.path.normpath(folder))} ({model_type})",
                       patch_size=int(config.patch_size), num_registers=int(getattr(config, "num_register_tokens", 0)),
                       mean=tuple(pre.get("image_mean", IMAGENET_MEAN)), std=tuple(pre.get("image_std", IMAGENET_STD)),
                       device=device)
