"""DINO encoding node: CLS, register and patch tokens of subject crops and a whole image (000, 001)."""
from __future__ import annotations

import math
import os
from dataclasses import replace

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..models.encoding.dino import DinoEncoder, DinoFeatures, DinoModelError, encode_dino, load_hf_dino
from . import paths, types
from .errors import node_error

CATEGORY = "Troupe/encoding"
NODE = "TroupeEncodeDINO"
NONE = "none"


# --------------------------------------------------------------------------- sources


def comfy_dino_encoder(clip_vision, node: str = NODE, input_name: str = "clip_vision") -> DinoEncoder:
    """ComfyUI's own DINOv2 (Load CLIP Vision, large/giant): fixed 518 px, no registers."""
    import comfy.image_encoders.dino2

    model = getattr(clip_vision, "model", None)
    if not isinstance(model, comfy.image_encoders.dino2.Dinov2Model):
        raise node_error(node, input_name, f"got a {type(model).__name__}, not a DINOv2 model; for "
                         "CLIP/SigLIP use TroupeEncodeSubjects, here load a DINOv2 file with Load CLIP Vision or "
                         "pick a DINO folder in 'dino_model'")
    patch = int(model.embeddings.patch_embeddings.projection.kernel_size[0])
    side = math.isqrt(model.embeddings.position_embeddings.shape[1] - 1) * patch
    depth, width = len(model.encoder.layer), int(model.layernorm.weight.shape[0])
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    return DinoEncoder(model=model, name=f"DINOv2 (ComfyUI, {depth} layers, width {width}, {side} px)",
                       patch_size=patch, mean=tuple(clip_vision.image_mean), std=tuple(clip_vision.image_std),
                       fixed_size=side, device=clip_vision.load_device)


_HF_CACHE: dict[tuple[str, float], tuple[DinoEncoder, comfy.model_patcher.ModelPatcher]] = {}


def hf_dino_encoder(name: str, node: str = NODE) -> DinoEncoder:
    """A HF DINOv2/DINOv3 folder from models/dino, kept loaded (one at a time) and managed by ComfyUI."""
    try:
        folder = paths.hf_folder_path("dino", name)
    except ValueError as e:
        raise node_error(node, "dino_model", str(e)) from None
    key = (folder, max(os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)))
    if key not in _HF_CACHE:
        _HF_CACHE.clear()
        try:
            encoder = load_hf_dino(folder)
        except DinoModelError as e:
            raise node_error(node, "dino_model", str(e)) from None
        load_device = comfy.model_management.text_encoder_device()
        patcher = comfy.model_patcher.ModelPatcher(encoder.model, load_device=load_device,
                                                   offload_device=comfy.model_management.text_encoder_offload_device())
        _HF_CACHE[key] = (encoder, patcher)
    encoder, patcher = _HF_CACHE[key]
    # full load: ComfyUI's partial (lowvram) load skips buffers and non-leaf parameters of plain HF modules
    # (DINOv3's RoPE inv_freq, the CLS/register tokens), which would stay on the offload device
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return replace(encoder, device=patcher.load_device)


def dino_source(clip_vision, dino_model: str) -> DinoEncoder:
    """Exactly one source: ComfyUI's DINOv2 (clip_vision) or a HF folder (dino_model)."""
    folder = dino_model not in (None, "", NONE)
    if clip_vision is not None and folder:
        raise node_error(NODE, None, f"both 'clip_vision' and 'dino_model' ({dino_model}) are given; keep one: "
                         "disconnect clip_vision or set dino_model to 'none'")
    if clip_vision is None and not folder:
        raise node_error(NODE, None, "no DINO model: connect a DINOv2 from Load CLIP Vision to 'clip_vision' or pick "
                         "a DINOv2/DINOv3 folder (HF transformers, config.json + weights) from models/dino in "
                         "'dino_model'")
    return comfy_dino_encoder(clip_vision) if clip_vision is not None else hf_dino_encoder(dino_model)


def encode_subjects_dino(subjects, clip_vision=None, dino_model: str = NONE, resolution: int = 224,
                         image: torch.Tensor | None = None) -> DinoFeatures:
    """Sec. 3.4 of 000 / 3.3 of 001: each subject's crop (first reference) and the optional whole image."""
    encoder = dino_source(clip_vision, dino_model)
    images = [s.image[0] for s in subjects]
    masks = [None if s.mask is None else s.masks()[0] for s in subjects]
    progress = comfy.utils.ProgressBar(1)  # one batched forward for every subject (and the whole image)
    try:
        features = encode_dino(encoder, images, masks, [s.label for s in subjects], image=image, resolution=resolution)
    except ValueError as e:
        raise node_error(NODE, None, str(e)) from None
    progress.update(1)
    return features


# --------------------------------------------------------------------------- node


class TroupeEncodeDINO(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Troupe Encode DINO (CLS + patch tokens)",
            category=CATEGORY,
            description="DINO features for alignment (R^3-Adapter, MultiPersona-Align): the CLS, register and "
                        "patch tokens of every subject's crop (one batched forward) and of an optional whole "
                        "reference image. Use a DINOv2 from Load CLIP Vision (518 px) or a HF DINOv2/DINOv3 "
                        "folder from models/dino; shows the token shapes.",
            inputs=[
                types.Subjects.Input("subjects", tooltip="The subjects to encode (first reference image of each, "
                                                         "cropped to its mask on white and padded square)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A DINOv2 large/giant from Load CLIP Vision (fixed 518 px). Leave empty "
                                            "when you pick a folder in dino_model."),
                io.Combo.Input("dino_model", options=[NONE, *paths.list_hf_folders("dino")], default=NONE,
                               tooltip="A HF transformers DINOv2 or DINOv3 ViT folder (config.json + weights) in "
                                       "ComfyUI/models/dino; DINOv3 needs transformers >= 4.56. 'none' to use "
                                       "clip_vision."),
                io.Int.Input("resolution", default=224, min=14, max=2048, step=1,
                             tooltip="Input size for dino_model folders, snapped to a multiple of the patch size "
                                     "(14 for DINOv2, 16 for DINOv3); a whole image keeps its aspect at about "
                                     "this many pixels squared. Ignored for clip_vision (518 px)."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional whole reference image whose patch tokens are kept too."),
            ],
            outputs=[types.DinoFeatures.Output(display_name="dino_features",
                                               tooltip="CLS, register and patch tokens of every subject (and the whole image).")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dino_model: str) -> bool | str:
        """At queue time: 0.3.75 does not check V3 combo values itself."""
        return paths.check_dino_folder(NODE, dino_model, NONE)

    @classmethod
    def execute(cls, subjects, dino_model: str, resolution: int, clip_vision=None, image=None) -> io.NodeOutput:
        features = encode_subjects_dino(subjects, clip_vision, dino_model, resolution, image)
        return io.NodeOutput(features, ui=ui.PreviewText(features.summary()))
