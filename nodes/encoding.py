"""Reference encoding nodes: hierarchical CLIP features, HMoE fusion, granularity control, weight preview."""
from __future__ import annotations

import json

import comfy.model_management  # noqa: F401 (ruff reads it as shadowed by the local comfy.clip_vision import)
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..models.adapter_file import AdapterFormatError, read_state_dict
from ..models.encoding.clip_features import (
    AS_TRAINED,
    CROP_CHOICES,
    check_layers,
    crops_to_encode,
    default_layers,
    encoder_kind,
    record_layers,
    stack_levels,
    subject_batch,
)
from ..models.encoding.hmoe import FusionCheckpointError, HMoE, hmoe_from_state_dict
from ..models.encoding.reference_features import ClipFeatures, CropView, fuse, override_weights
from ..models.encoding.siglip_head import SiglipPoolingHead, has_head, head_from_state_dict
from ..models.encoding.weights_chart import draw_fusion_weights
from . import paths, types
from .errors import error_text, node_error, number_error

CATEGORY = "Troupe/encoding"


# --------------------------------------------------------------------------- work functions


def vision_blocks(clip_vision) -> torch.nn.ModuleList:
    """The transformer blocks of a ComfyUI CLIP_VISION model (CLIP, SigLIP)."""
    try:
        return clip_vision.model.vision_model.encoder.layers
    except AttributeError:
        raise ValueError("TroupeEncodeSubjects: input 'clip_vision' is not a CLIP/SigLIP vision model (DINOv2 "
                         "goes to TroupeEncodeDINO); load a CLIP vision file with Load CLIP Vision") from None


def encoder_name(clip_vision) -> str:
    vm = clip_vision.model.vision_model
    depth = len(vm.encoder.layers)
    width = vm.encoder.layers[0].layer_norm1.weight.shape[0]
    return f"{depth} layers, width {width}, {clip_vision.image_size} px"


def parse_layers(text: str, depth: int) -> tuple[int, int, int]:
    """'auto' or three 1-based layer numbers 'low,mid,high'."""
    text = (text or "auto").strip().lower()
    if text == "auto":
        return default_layers(depth)
    try:
        layers = tuple(int(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        raise node_error("TroupeEncodeSubjects", "layers", f"expected 'auto' or three numbers like '10,17,24', "
                         f"got {text!r}") from None
    if len(layers) != 3:
        raise node_error("TroupeEncodeSubjects", "layers", f"expected three layers (low, mid, high), got {layers}")
    return check_layers(layers, depth, where="TroupeEncodeSubjects: input 'layers'")


def is_siglip(clip_vision) -> bool:
    """SigLIP (no CLS token; ComfyUI applies the post-layernorm to every token) rather than CLIP."""
    return bool(getattr(clip_vision.model.vision_model, "output_layernorm", False))


_HEADS: dict[tuple[str, float], tuple[torch.Tensor, SiglipPoolingHead] | None] = {}


def siglip_head(clip_vision) -> tuple[SiglipPoolingHead | None, str]:
    """The attention-pooling head of the SigLIP file this model was loaded from, found in models/clip_vision
    (the safetensors file whose post-layernorm equals the loaded one's), and its file name; (None, "") if none."""
    import os

    from safetensors import safe_open

    vm = clip_vision.model.vision_model
    ref = vm.post_layernorm.weight.detach().float().cpu()
    heads = vm.encoder.layers[0].self_attn.heads
    norm = "vision_model.post_layernorm.weight"
    for name in folder_paths.get_filename_list("clip_vision"):
        path = folder_paths.get_full_path("clip_vision", name)
        if not path or not path.endswith(".safetensors"):
            continue
        key = (path, os.path.getmtime(path))
        if key not in _HEADS:  # read each file's head once (a few MB), not its weights
            _HEADS[key] = None
            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
                if has_head(keys) and norm in keys:
                    sd = {k: f.get_tensor(k) for k in keys if k.startswith("vision_model.head.")}
                    _HEADS[key] = (f.get_tensor(norm).float(), head_from_state_dict(sd, heads))
        entry = _HEADS[key]
        if entry is not None and entry[0].shape == ref.shape and torch.equal(entry[0], ref):
            return entry[1], name
    return None, ""


def encode_subjects(clip_vision, subjects, layers: str = "auto", fusion: HMoE | None = None,
                    crop: str = AS_TRAINED, head: SiglipPoolingHead | None = None) -> ClipFeatures:
    """Every subject's crop in one batched forward; record the low/mid/high layers (Sec. 4.2 of 004).

    The same forward also records the penultimate layer (MS-Diffusion, IP-Adapter Plus) and encodes one
    all-zero normalised image, IP-Adapter's unconditional image prompt, as an extra batch row. ``crop`` picks
    the crop geometry, or with "as trained" the geometries the encoder's adapter families were trained with
    (each in the same forward). SigLIP's pooled output comes from ``head`` (its attention-pooling head), else
    from the mean token.
    """
    import comfy.clip_vision

    blocks = vision_blocks(clip_vision)
    depth = len(blocks)
    chosen = parse_layers(layers, depth)
    penultimate = max(depth - 1, 1)
    images = [s.image[0] for s in subjects]
    masks = [None if s.mask is None else s.masks()[0] for s in subjects]
    n, size = len(images), clip_vision.image_size
    siglip = is_siglip(clip_vision)
    width = blocks[0].layer_norm1.weight.shape[0]
    try:
        crops = crops_to_encode(crop, encoder_kind(depth, width, size, siglip))
    except ValueError as e:
        raise node_error("TroupeEncodeSubjects", "crop", str(e)) from None
    progress = comfy.utils.ProgressBar(n + 1)  # one step per subject's crops, one for the batched forward
    per_subject = []
    for i in range(n):
        per_subject.append([subject_batch(images[i:i + 1], masks[i:i + 1], size, c) for c in crops])
        progress.update(1)
    batch = torch.cat([per_subject[i][k] for k in range(len(crops)) for i in range(n)])  # crop-major
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    device = clip_vision.load_device
    pixels = comfy.clip_vision.clip_preprocess(batch.to(device), size=size, mean=clip_vision.image_mean,
                                               std=clip_vision.image_std, crop=False).float()
    pixels = torch.cat([pixels, torch.zeros_like(pixels[:1])])  # the unconditional row
    with torch.inference_mode(), record_layers(blocks, sorted({*chosen, penultimate})) as store:
        out = clip_vision.model(pixel_values=pixels)
        hidden = stack_levels(store, chosen).float()
        second = store[penultimate].float()
        embeds = out[2] if isinstance(out, (tuple, list)) and len(out) > 2 and torch.is_tensor(out[2]) else None
        embeds = None if embeds is None else embeds.float().clone()
        pooled, summary, source = pooled_outputs(clip_vision, hidden, out, head, siglip)
    progress.update(1)
    dev = comfy.model_management.intermediate_device()
    rows = len(crops) * n

    def part(t, i):
        return None if t is None else t[i * n:(i + 1) * n].to(dev)

    views = {c: CropView(part(second, i), part(embeds, i), part(pooled, i)) for i, c in enumerate(crops)}
    features = ClipFeatures(hidden=hidden[:n].to(dev), layers=chosen, encoder=encoder_name(clip_vision),
                            labels=tuple(s.label for s in subjects), depth=depth,
                            image_embeds=part(embeds, 0), penultimate=part(second, 0),
                            uncond_penultimate=second[rows:].to(dev),
                            uncond_image_embeds=None if embeds is None else embeds[rows:].to(dev),
                            crop=crops[0], crop_choice=crop, crop_views=views, pooled=part(pooled, 0),
                            pooled_source=source, summary=None if summary is None else summary[:n].to(dev))
    if fusion is not None:
        if fusion.config.in_dim != features.width:
            raise node_error("TroupeEncodeSubjects", "fusion", f"the file was trained for encoder width "
                             f"{fusion.config.in_dim} but this CLIP vision model has width {features.width}; "
                             "load the fusion file that matches the encoder")
        features = fuse(features, fusion)
    return features


def pooled_outputs(clip_vision, hidden: torch.Tensor, out, head: SiglipPoolingHead | None, siglip: bool):
    """(pooled [B, D], router summary [B, L, D] or None, source) of one forward.

    CLIP: the pooled output is the projected CLS (``image_embeds``) and the router reads each level's CLS token.
    SigLIP has no CLS token: the pooled output is its attention-pooling head on the post-layernorm tokens (the
    mean token without the head), and the router reads the same pooling of each level's post-layernorm tokens.
    """
    if not siglip:
        return None, None, ""
    norm = clip_vision.model.vision_model.post_layernorm
    last = out[0].float()
    levels = norm(hidden.to(norm.weight.dtype)).float()  # [B, L, G, D]
    if head is not None:
        head = head.to(last.device)
        pooled = head(last)
        summary = torch.stack([head(levels[:, i]) for i in range(levels.shape[1])], dim=1)
        return pooled, summary, "attention-pooling head"
    return last.mean(1), levels.mean(2), "mean of tokens (no pooling head found: an approximation)"


def load_fusion(name: str) -> HMoE:
    """An HMoE checkpoint from models/troupe (safetensors, or a weights-only torch file)."""
    path = folder_paths.get_full_path_or_raise("troupe", name)
    try:  # the pack's safe reader: truncated, non-tensor and code-running files are refused with the file named
        return hmoe_from_state_dict(read_state_dict(path))
    except (FusionCheckpointError, AdapterFormatError) as e:
        raise node_error("TroupeLoadFusion", "fusion_name", f"{name}: {e}") from None


def weights_table(features: ClipFeatures) -> str:
    """The routed and used weights as text, one subject per line."""
    lines = []
    for i, label in enumerate(features.labels):
        r = ", ".join(f"{x:.3f}" for x in features.routed[i].tolist())
        w = ", ".join(f"{x:.3f}" for x in features.weights[i].tolist())
        lines.append(f"{i + 1} {label}: routed [{r}]" + ("" if r == w else f" -> used [{w}]"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- nodes


class TroupeLoadFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeLoadFusion",
            display_name="Troupe Load Fusion (HMoE)",
            category=CATEGORY,
            description="Load HMoE feature-fusion weights (DynaIP Eqs. 6-8) from models/troupe. The file holds "
                        "three experts and the router for one CLIP vision encoder width.",
            inputs=[io.Combo.Input("fusion_name", options=paths.list_files("troupe"),
                                   tooltip="A fusion .safetensors in ComfyUI/models/troupe (key layout in the README).")],
            outputs=[types.Fusion.Output(display_name="fusion",
                                         tooltip="HMoE fusion weights: connect them to Troupe Encode Subjects.")],
        )

    @classmethod
    def validate_inputs(cls, fusion_name: str) -> bool | str:
        """At queue time: 0.3.75 does not check V3 combo values itself."""
        return paths.check_listed("TroupeLoadFusion", "fusion_name", "troupe", fusion_name, "fusion .safetensors")

    @classmethod
    def execute(cls, fusion_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_fusion(fusion_name))


class TroupeEncodeSubjects(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeEncodeSubjects",
            display_name="Troupe Encode Subjects (hierarchical CLIP)",
            category=CATEGORY,
            description="Encode every subject's reference (cropped to its mask on white, then made square the way "
                        "the adapter was trained) in one batched CLIP vision forward and keep the full tokens of a "
                        "low, a mid and a high layer. With fusion weights, fuse them with the routed HMoE weights. "
                        "SigLIP: the pooled output comes from the attention-pooling head of your SigLIP file in "
                        "models/clip_vision (found automatically); shows which crop and pooling it used.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="A CLIP/SigLIP vision model from Load CLIP Vision."),
                types.Subjects.Input("subjects", tooltip="The subjects to encode (first reference image of each)."),
                io.String.Input("layers", default="auto",
                                tooltip="'auto' (DynaIP's 10,17,24 of 24, scaled by depth: ViT-H 13,23,32; "
                                        "bigG 20,34,48; SigLIP 11,19,27) or three 1-based layers 'low,mid,high'."),
                types.Fusion.Input("fusion", optional=True,
                                   tooltip="Optional HMoE fusion weights; without them adapters use the high layer."),
                io.Combo.Input("crop", options=list(CROP_CHOICES), default=AS_TRAINED, optional=True,
                               tooltip="How a reference becomes square. 'as trained': as the adapter family of this "
                                       "encoder was trained (IP-Adapter, XLabs: centre crop; MS-Diffusion, "
                                       "InstantX: stretch; DynaIP ViT-L-336: pad; ViT-bigG encodes both stretch "
                                       "and centre crop, each file reads its own). 'pad': white borders, nothing "
                                       "cut; 'centre crop': short side to size, centre square; 'stretch': resized "
                                       "to a square."),
            ],
            outputs=[types.ClipFeatures.Output(display_name="features",
                                               tooltip="Every subject's hierarchical CLIP features (and the fused tokens), for the SDXL and FLUX adapters.")],
        )

    @classmethod
    def validate_inputs(cls, crop: str = AS_TRAINED) -> bool | str:
        """At queue time: 0.3.75 does not check V3 combo values itself (no ``**kw``: it would repeat the message once
        per input)."""
        if crop in CROP_CHOICES:
            return True
        return error_text("TroupeEncodeSubjects", "crop", f"expected one of {', '.join(CROP_CHOICES)}, got {crop!r}")

    @classmethod
    def execute(cls, clip_vision, subjects, layers: str, fusion=None, crop: str = AS_TRAINED) -> io.NodeOutput:
        head, head_file = (None, "")
        vision_blocks(clip_vision)  # a clear error for a model that is not CLIP / SigLIP
        if is_siglip(clip_vision):
            head, head_file = siglip_head(clip_vision)
        features = encode_subjects(clip_vision, subjects, layers, fusion, crop, head)
        return io.NodeOutput(features, ui=ui.PreviewText(encoding_report(features, head_file)))


def encoding_report(features: ClipFeatures, head_file: str = "") -> str:
    """What the node shows: the crops it made and, for SigLIP, where the pooled output came from."""
    extra = [c for c in features.crop_views if c != features.crop]
    crop = f"crop: {features.crop}" + (" (as trained)" if features.crop_choice == AS_TRAINED else "")
    lines = [crop + (f"; also {', '.join(extra)}, for the encoder's other adapter family" if extra else "")]
    if features.pooled_source and head_file:
        lines.append(f"pooled output: SigLIP attention-pooling head from {head_file}")
    elif features.pooled_source:
        lines.append("WARNING: no SigLIP attention-pooling head found (a .safetensors in models/clip_vision with "
                     "vision_model.head.* and these weights): the pooled output is the mean token, an "
                     "approximation of what InstantX was trained on")
    return "\n".join(lines)


class TroupeGranularity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeGranularity",
            display_name="Troupe Granularity (fusion weights)",
            category=CATEGORY,
            description="Replace the router's fusion weights [low, mid, high] with your own (normalised to sum "
                        "to 1), for one subject or all (DynaIP B.4): more low = lines and text, more mid = "
                        "fine texture, more high = semantics. Shows the routed weights it replaced.",
            inputs=[
                types.ClipFeatures.Input("features", tooltip="Fused features from TroupeEncodeSubjects (with fusion)."),
                io.Float.Input("w_low", default=1.0, min=0.0, max=10.0, step=0.05, tooltip="Low-level expert weight."),
                io.Float.Input("w_mid", default=1.0, min=0.0, max=10.0, step=0.05, tooltip="Mid-level expert weight."),
                io.Float.Input("w_high", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="High-level expert weight."),
                io.Int.Input("subject", default=0, min=0, max=8,
                             tooltip="0 = all subjects, or the subject number (1-8) to change."),
            ],
            outputs=[types.ClipFeatures.Output(display_name="features",
                                               tooltip="Every subject's hierarchical CLIP features (and the fused tokens), for the SDXL and FLUX adapters."),
                     io.String.Output(display_name="routed_weights",
                                      tooltip="The router's fusion weights per subject, as text.")],
        )

    @classmethod
    def validate_inputs(cls, w_low: float = 1.0, w_mid: float = 1.0, w_high: float = 1.0) -> bool | str:
        """At queue time: NaN passes ComfyUI's min/max, which declaring the weights here turns off."""
        for name, value in (("w_low", w_low), ("w_mid", w_mid), ("w_high", w_high)):
            if (problem := number_error("TroupeGranularity", name, value, 0.0, 10.0)) is not None:
                return problem
        if float(w_low) + float(w_mid) + float(w_high) <= 0.0:
            return error_text("TroupeGranularity", "w_low", "the three weights are all 0; give at least one a "
                                                            "positive weight")
        return True

    @classmethod
    def execute(cls, features: ClipFeatures, w_low: float, w_mid: float, w_high: float, subject: int) -> io.NodeOutput:
        try:
            out = override_weights(features, [w_low, w_mid, w_high], subject)
        except ValueError as e:
            raise node_error("TroupeGranularity", None, str(e)) from None
        text = weights_table(out)
        return io.NodeOutput(out, json.dumps(out.routed.tolist()), ui=ui.PreviewText(text))


class TroupeFusionWeightsPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeFusionWeightsPreview",
            display_name="Troupe Fusion Weights Preview",
            category=CATEGORY,
            description="A bar chart of each subject's fusion weights [low, mid, high]: routed by HMoE, and the "
                        "override when TroupeGranularity changed them.",
            inputs=[types.ClipFeatures.Input("features", tooltip="Fused features (TroupeEncodeSubjects with fusion).")],
            outputs=[io.Image.Output(display_name="chart",
                                     tooltip="Bar chart of each subject's routed and used fusion weights.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, features: ClipFeatures) -> io.NodeOutput:
        if features.routed is None:
            raise ValueError("TroupeFusionWeightsPreview: input 'features' has no fusion weights; connect "
                             "TroupeLoadFusion to TroupeEncodeSubjects")
        chart = draw_fusion_weights(features.routed, features.weights, features.labels)
        return io.NodeOutput(chart, ui=ui.PreviewImage(chart, cls=cls))
