"""OpenCLIP image and text towers from local files only (``open_clip_torch``; nothing is downloaded).

Two layouts, both what the model hubs publish:
- a folder with ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``) and the weights
  (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), loaded as ``local-dir:<folder>``; a
  tokenizer the config names (``hf_tokenizer_name``) must be saved in the same folder;
- a single weights file plus the architecture name of one of open_clip's built-in configs (``ViT-L-14``).

Images arrive prepared as squares at the tower's input size (``evaluation.crops``); they are normalised with
the model's own mean and std. Resizing uses torch's antialiased bicubic, not PIL's (differences ~1e-3).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from .backbones import ImageTextModel, ImageTower, TextTower

CONFIG = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipError(ValueError):
    """An OpenCLIP model that cannot be loaded; the message says what to put where."""


def import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise OpenClipError("OpenCLIP models need the open_clip_torch package: pip install open_clip_torch "
                            "(or use ComfyUI's own CLIP vision + CLIP text)") from None
    return open_clip


def is_openclip_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG))


def folder_has_weights(path: str) -> bool:
    return any(f.lower().endswith(WEIGHT_SUFFIXES) for f in os.listdir(path))


def read_folder_config(path: str) -> dict:
    with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    if "model_cfg" not in config:
        raise OpenClipError(f"{os.path.join(path, CONFIG)} has no 'model_cfg'; use the open_clip_config.json "
                            "published with the model (it holds model_cfg and preprocess_cfg)")
    return config


def create(path: str, architecture: str = ""):
    """(model, tokenizer or None, why-no-tokenizer) from a local folder or a single file + built-in architecture."""
    open_clip = import_open_clip()
    if os.path.isdir(path):
        if not is_openclip_folder(path):
            raise OpenClipError(f"{os.path.basename(path)} has no {CONFIG}; an OpenCLIP folder holds {CONFIG} and "
                                "open_clip_model.safetensors (or open_clip_pytorch_model.bin)")
        read_folder_config(path)
        if not folder_has_weights(path):
            raise OpenClipError(f"{os.path.basename(path)} has {CONFIG} but no weights file; put "
                                "open_clip_model.safetensors (or open_clip_pytorch_model.bin) beside it")
        name = f"local-dir:{path}"
        model = open_clip.create_model(name, device="cpu", weights_only=True)
        tokenizer_name = name
    else:
        if not architecture:
            raise OpenClipError(f"{os.path.basename(path)} is a single weights file: give its architecture, one of "
                                "open_clip's built-in names such as ViT-B-32, ViT-L-14, ViT-H-14, ViT-bigG-14, or put "
                                f"it in a folder with its {CONFIG}")
        if architecture not in open_clip.list_models():
            raise OpenClipError(f"unknown OpenCLIP architecture {architecture!r}; built-in names include ViT-B-32, "
                                "ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, ViT-bigG-14 (open_clip.list_models())")
        try:
            model = open_clip.create_model(architecture, pretrained=path, device="cpu", weights_only=True)
        except RuntimeError as e:
            raise OpenClipError(f"{os.path.basename(path)} does not fit architecture {architecture}: "
                                f"{str(e).splitlines()[0][:300]}") from None
        tokenizer_name = architecture
    try:
        tokenizer, why = open_clip.get_tokenizer(tokenizer_name), ""
    except Exception as e:  # noqa: BLE001  an HF tokenizer that is not saved locally: CLIP-I still works
        tokenizer, why = None, f"no local tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return model.float().eval(), tokenizer, why


def preprocess_params(model) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input side, mean and std the model was trained with (its preprocess_cfg)."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if size[0] != size[-1]:
            raise OpenClipError(f"non-square OpenCLIP input {tuple(size)} is not supported")
        size = size[0]
    return int(size), tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


def openclip_model(path: str, architecture: str = "", device: torch.device | str = "cpu",
                   model=None, tokenizer=None, why: str = "") -> ImageTextModel:
    """TROUPE_IMAGE_TEXT of an OpenCLIP model: CLIP-I from ``encode_image``, CLIP-T from ``encode_text``."""
    if model is None:
        model, tokenizer, why = create(path, architecture)
    size, mean, std = preprocess_params(model)
    label = os.path.basename(os.path.normpath(path))
    arch = architecture or read_folder_config(path)["model_cfg"].get("vision_cfg", {}).get("timm_model_name", "")
    name = f"OpenCLIP {label}" + (f" ({arch})" if arch else "") + f", {size} px"

    def encode_image(batch: torch.Tensor) -> torch.Tensor:
        x = batch[..., :3].movedim(-1, 1).float().to(device)
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            return model.encode_image((x - m) / s).float().cpu()

    text = None
    if tokenizer is not None:
        def encode_text(prompts: Sequence[str]) -> torch.Tensor:
            with torch.inference_mode():
                return model.encode_text(tokenizer(list(prompts)).to(device)).float().cpu()
        text = TextTower(name=f"{name}, text tower", encode=encode_text)
    source = "OpenCLIP" + (f" (CLIP-T off: {why})" if text is None and why else "")
    return ImageTextModel(image=ImageTower(name=name, size=size, encode=encode_image), text=text, source=source)
