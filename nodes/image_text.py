"""Image-text models for the fidelity metrics: an OpenCLIP folder or file, or ComfyUI's own CLIP vision + CLIP text."""
from __future__ import annotations

import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..evaluation.backbones import ImageTextModel, ImageTower, TextTower
from ..evaluation.openclip import OpenClipError, create, folder_has_weights, is_openclip_folder, openclip_model
from . import types
from .errors import node_error

CATEGORY = "Troupe/evaluation"
OPENCLIP_NODE = "TroupeLoadOpenCLIP"
COMFY_NODE = "TroupeImageTextCLIP"
FOLDER = "openclip"
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


# --------------------------------------------------------------------------- OpenCLIP from models/openclip


def openclip_choices() -> list[str]:
    """Folders with an open_clip_config.json (the hub layout), then single weight files, relative to models/openclip."""
    folders, files = set(), set()
    for root in folder_paths.get_folder_paths(FOLDER) if FOLDER in folder_paths.folder_names_and_paths else []:
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, names in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            if is_openclip_folder(dirpath):
                folders.add(rel)
                continue
            files.update(os.path.normpath(os.path.join(rel, n)) for n in names if n.lower().endswith(WEIGHTS))
    inside = {f for f in files if any(f.startswith(d + os.sep) for d in folders)}
    return sorted(folders) + sorted(files - inside)


def openclip_path(name: str) -> str:
    for root in folder_paths.get_folder_paths(FOLDER):
        path = os.path.join(root, name)
        if os.path.isdir(path) or os.path.isfile(path):
            return path
    raise node_error(OPENCLIP_NODE, "model_name", f"no '{name}' in models/{FOLDER}; put an OpenCLIP folder "
                     "(open_clip_config.json + open_clip_model.safetensors) or a weights file there and refresh")


_OPENCLIP_CACHE: dict[tuple, tuple[ImageTextModel, comfy.model_patcher.ModelPatcher]] = {}


def load_openclip(name: str, architecture: str = "") -> ImageTextModel:
    """An OpenCLIP model, kept loaded (one at a time) and moved by ComfyUI's model management."""
    path = openclip_path(name)
    if os.path.isdir(path) and is_openclip_folder(path) and not folder_has_weights(path):
        raise node_error(OPENCLIP_NODE, "model_name", f"{name} has open_clip_config.json but no weights; put "
                         "open_clip_model.safetensors (or open_clip_pytorch_model.bin) beside it")
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in os.listdir(path)]
    key = (path, architecture.strip(), max(os.path.getmtime(f) for f in files))
    if key not in _OPENCLIP_CACHE:
        _OPENCLIP_CACHE.clear()
        try:
            model, tokenizer, why = create(path, architecture.strip())
        except OpenClipError as e:
            raise node_error(OPENCLIP_NODE, "architecture" if os.path.isfile(path) else "model_name", str(e)) from None
        device = comfy.model_management.text_encoder_device()
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                                   offload_device=comfy.model_management.text_encoder_offload_device())
        built = openclip_model(path, architecture.strip(), device=device, model=model, tokenizer=tokenizer, why=why)
        _OPENCLIP_CACHE[key] = (built, patcher)
    built, patcher = _OPENCLIP_CACHE[key]
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return built


class TroupeLoadOpenCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=OPENCLIP_NODE,
            display_name="Troupe Load OpenCLIP (fidelity metrics)",
            category=CATEGORY,
            description="An OpenCLIP model from ComfyUI/models/openclip, loaded with open_clip_torch from local files "
                        "only, for TroupeFidelity: CLIP-I (image tower) and CLIP-T (text tower).",
            inputs=[
                io.Combo.Input("model_name", options=openclip_choices(),
                               tooltip="A folder holding open_clip_config.json + open_clip_model.safetensors (as "
                                       "published on the model hubs, e.g. ViT-L-14 laion2b), or a single weights "
                                       "file (then set architecture). Folder: ComfyUI/models/openclip."),
                io.String.Input("architecture", default="",
                                tooltip="Only for a single weights file: open_clip's built-in architecture name, "
                                        "e.g. ViT-B-32, ViT-L-14, ViT-H-14, ViT-bigG-14. Leave empty for a folder."),
            ],
            outputs=[types.ImageText.Output(display_name="image_text",
                                            tooltip="An image-text model for Troupe Fidelity's CLIP-I and CLIP-T scores.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        """At queue time: 0.3.75 does not check V3 combo values itself."""
        if model_name in openclip_choices():
            return True
        return (f"{OPENCLIP_NODE}: input 'model_name': no OpenCLIP folder or file '{model_name}' in "
                f"models/{FOLDER}; put it there and refresh (R), or pick another")

    @classmethod
    def execute(cls, model_name: str, architecture: str) -> io.NodeOutput:
        model = load_openclip(model_name, architecture)
        return io.NodeOutput(model, ui=ui.PreviewText(model.summary()))


# --------------------------------------------------------------------------- ComfyUI CLIP vision + CLIP text


def comfy_image_tower(clip_vision) -> ImageTower:
    """ComfyUI's CLIP vision: the projected ``image_embeds`` (CLIP ViT only; SigLIP has no pooled head there)."""
    import comfy.clip_vision
    import comfy.image_encoders.dino2

    model = getattr(clip_vision, "model", None)
    if isinstance(model, comfy.image_encoders.dino2.Dinov2Model):
        raise node_error(COMFY_NODE, "clip_vision", "this is a DINOv2 model: connect it to TroupeFidelity's "
                         "'dino_vision' input, and a CLIP vision model (ViT-L/14, ViT-H/14, ViT-bigG/14) here")
    if getattr(clip_vision, "return_all_hidden_states", False) or not hasattr(model, "visual_projection"):
        raise node_error(COMFY_NODE, "clip_vision", "SigLIP has no pooled image embedding in ComfyUI; use a CLIP "
                         "vision model (ViT-L/14, ViT-H/14, ViT-bigG/14) here, or an OpenCLIP folder with "
                         "TroupeLoadOpenCLIP")
    vm = model.vision_model
    depth, width = len(vm.encoder.layers), int(vm.encoder.layers[0].layer_norm1.weight.shape[0])
    proj = int(model.visual_projection.weight.shape[0])
    size = int(clip_vision.image_size)

    def encode(batch: torch.Tensor) -> torch.Tensor:
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        pixels = comfy.clip_vision.clip_preprocess(batch.to(clip_vision.load_device), size=size,
                                                   mean=clip_vision.image_mean, std=clip_vision.image_std,
                                                   crop=False).float()
        with torch.inference_mode():
            return model(pixel_values=pixels)[2].float().cpu()

    name = f"ComfyUI CLIP vision ({depth} layers, width {width}, projection {proj}, {size} px)"
    return ImageTower(name=name, size=size, encode=encode)


def clip_text_encoders(clip) -> list[tuple[str, torch.nn.Module]]:
    """The CLIP text towers inside a ComfyUI CLIP (clip_l, clip_g), keyed as its tokenizer keys them; T5 is skipped."""
    found = []
    for attr, child in clip.cond_stage_model.named_children():
        transformer = getattr(child, "transformer", None)
        if transformer is not None and hasattr(transformer, "text_projection") and hasattr(child, "encode_token_weights"):
            found.append((attr.removeprefix("clip_"), child))
    return found


def comfy_text_tower(clip, width: int) -> TextTower:
    """The CLIP text tower whose projected pooled output has the image tower's width (clip_l for ViT-L/14, ...)."""
    encoders = clip_text_encoders(clip)
    widths = {key: int(enc.transformer.text_projection.weight.shape[0]) for key, enc in encoders}
    matching = [key for key, w in widths.items() if w == width]
    if not matching:
        found = ", ".join(f"clip_{k} {w}" for k, w in widths.items()) or "no CLIP text tower (T5 only?)"
        raise node_error(COMFY_NODE, "clip", f"no CLIP text tower projects to the CLIP vision width {width} "
                         f"(found: {found}); load the text encoder of the same CLIP as the vision model (ViT-L/14 "
                         "vision with clip_l, ViT-bigG/14 with clip_g), or leave 'clip' empty to measure CLIP-I only")
    key = matching[0]
    encoder = dict(encoders)[key]

    def encode(prompts) -> torch.Tensor:
        out = []
        clip.load_model()
        for prompt in prompts:
            tokens = clip.tokenize(prompt)
            if key not in tokens:
                raise node_error(COMFY_NODE, "clip", f"the tokenizer gives no '{key}' tokens for clip_{key}")
            encoder.reset_clip_options()
            encoder.set_clip_options({"projected_pooled": True})
            try:
                with torch.inference_mode():
                    pooled = encoder.encode_token_weights(tokens[key])[1]
            finally:
                encoder.reset_clip_options()
            out.append(pooled.float().cpu().reshape(-1, pooled.shape[-1])[:1])
        return torch.cat(out)

    return TextTower(name=f"ComfyUI CLIP text clip_{key} (projection {width})", encode=encode)


def comfy_image_text(clip_vision, clip=None) -> ImageTextModel:
    """CLIP-I from ComfyUI's CLIP vision; CLIP-T too when the matching CLIP text tower is connected."""
    image = comfy_image_tower(clip_vision)
    width = int(clip_vision.model.visual_projection.weight.shape[0])
    text = comfy_text_tower(clip, width) if clip is not None else None
    return ImageTextModel(image=image, text=text, source="ComfyUI CLIP vision" + (" + CLIP text" if text else ""))


class TroupeImageTextCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=COMFY_NODE,
            display_name="Troupe Image-Text Model (ComfyUI CLIP)",
            category=CATEGORY,
            description="ComfyUI's own CLIP vision (CLIP-I) plus, optionally, the CLIP text encoder of the same CLIP "
                        "(CLIP-T), for TroupeFidelity.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="A CLIP vision model from Load CLIP Vision (ViT-L/14, "
                                                          "ViT-H/14, ViT-bigG/14): its projected image embedding."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: a CLIP text encoder holding the text tower of the same CLIP (clip_l "
                                      "for ViT-L/14, clip_g for ViT-bigG/14); enables CLIP-T. Leave empty for "
                                      "CLIP-I only."),
            ],
            outputs=[types.ImageText.Output(display_name="image_text",
                                            tooltip="An image-text model for Troupe Fidelity's CLIP-I and CLIP-T scores.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clip_vision, clip=None) -> io.NodeOutput:
        model = comfy_image_text(clip_vision, clip)
        return io.NodeOutput(model, ui=ui.PreviewText(model.summary()))
