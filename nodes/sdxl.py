"""TroupeApplySDXL: patch a clone of an SDXL model with regional multi-subject cross-attention."""
from __future__ import annotations

import dataclasses
import functools

import comfy.ldm.modules.attention as comfy_attention
import torch
from comfy_api.latest import io, ui

from ..models.encoding.reference_features import ClipFeatures
from ..models.layout.layout import Layout
from ..models.sdxl.patch import (
    BLOCK_CHOICES,
    SUBJECT_SCALES,
    LayerKey,
    RegionalAttentionPatch,
    RegionalParams,
    check_widths,
    layer_keys_for,
    route_gates,
)
from ..models.sdxl.router import MODES, router_time
from . import lifecycle, types
from .errors import error_text, node_error, number_error
from .search import aliases

CATEGORY = "Troupe/apply"
NODE = "TroupeApplySDXL"


# --------------------------------------------------------------------------- inputs


def phrase_embeddings(clip, labels: tuple[str, ...]) -> torch.Tensor:
    """CLIP-L's unprojected pooled output of each label [N, width] (MS-Diffusion's phrase embedding)."""
    clip_l = getattr(clip.cond_stage_model, "clip_l", None)
    if clip_l is None:
        raise node_error(NODE, "clip", "this CLIP has no CLIP-L text encoder (clip_l); connect the SDXL checkpoint's CLIP")
    clip.load_model()
    out = []
    try:
        clip_l.reset_clip_options()
        clip_l.set_clip_options({"projected_pooled": False})
        with torch.inference_mode():
            for label in labels:
                tokens = clip.tokenize(label)
                _, pooled = clip_l.encode_token_weights(tokens["l"] if isinstance(tokens, dict) else tokens)[:2]
                out.append(pooled[0].float().cpu())
    finally:
        clip_l.reset_clip_options()
    return torch.stack(out)


def image_features(module, features: ClipFeatures) -> torch.Tensor:
    """The feature tensor the adapter's image projection takes, width-checked."""
    if module.image_input == "penultimate":
        try:
            x = features.layer(-2)
        except ValueError as e:
            raise node_error(NODE, "features", f"this adapter reads the penultimate CLIP vision layer: {e}") from None
        width = x.shape[-1]
    elif module.image_input == "image_embeds":
        x = features.image_embeds
        if x is None:
            raise node_error(NODE, "features", "this adapter takes the projected image embeds, but the CLIP vision model has no "
                                   "projection; load the CLIP vision file the adapter was trained with")
        width = x.shape[-1]
    else:
        raise node_error(NODE, "adapter", f"unknown image input {module.image_input!r}")
    if width != module.image_width:
        raise node_error(NODE, "features", f"the adapter expects CLIP vision features of width {module.image_width} but got "
                               f"{width} ({features.encoder}); encode with the CLIP vision model the adapter was "
                               "trained with (MS-Diffusion: ViT-bigG, IP-Adapter plus/base: ViT-H)")
    return x.float()


def attention_widths(model) -> dict[LayerKey, tuple[int, int]]:
    """Every cross-attention location of the UNet as ComfyUI keys it: (context width, inner width)."""
    unet = model.get_model_object("diffusion_model")
    if not hasattr(unet, "input_blocks"):
        raise node_error(NODE, "model", f"expected an SDXL UNet, got a {type(unet).__name__} model; connect an SDXL "
                                        "checkpoint's MODEL (FLUX models go to TroupeApplyFLUX)")
    found: dict[LayerKey, tuple[int, int]] = {}
    parts = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    parts += [("middle", 0, unet.middle_block)]
    parts += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    for name, idx, block in parts:
        for layer in block:
            for j, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                attn2 = getattr(tb, "attn2", None)
                if attn2 is not None:
                    found[(name, idx, j)] = (attn2.to_k.weight.shape[1], attn2.to_k.weight.shape[0])
    return found


# --------------------------------------------------------------------------- work function


def apply_sdxl(model, adapter, features: ClipFeatures, layout: Layout, params: RegionalParams, clip=None,
               start_percent: float = 0.0, end_percent: float = 1.0):
    """Return a patched clone of ``model`` (active from start to end percent); the model passed in is untouched."""
    if getattr(adapter, "family", None) != "sdxl":
        raise node_error(NODE, "adapter", f"expected an SDXL adapter, got a {getattr(adapter, 'family', type(adapter).__name__)}"
                              " one; load an MS-Diffusion, R^3 or IP-Adapter SDXL file with TroupeLoadAdapter")
    module = adapter.module
    trained = getattr(module, "trained_crop", None)
    features = features.for_crop(trained) if trained else features  # the geometry this file was trained with
    n = features.num_subjects
    if n != len(layout):
        raise node_error(NODE, "layout", f"{len(layout)} regions for {n} encoded subjects; draw one box per subject")
    if params.subject_weights and len(params.subject_weights) != n:
        raise node_error(NODE, "subjects", f"{len(params.subject_weights)} subjects connected but {n} were encoded; connect the "
                               "same subject list as TroupeEncodeSubjects")
    keys = layer_keys_for(module, params.blocks)
    if not keys:
        raise node_error(NODE, "blocks", f"the adapter has no layers in '{params.blocks}'; pick 'all'")
    try:
        check_widths(module, attention_widths(model), keys)
    except ValueError as e:
        raise node_error(NODE, "model", str(e)) from None
    if params.routing == "manual" or (params.refine and module.num_levels > 1):
        try:  # a malformed manual schedule or a file without router weights fails here, not mid-sampling
            route_gates(module, 0.5, params)
        except ValueError as e:
            raise node_error(NODE, "schedule" if params.routing == "manual" else "routing", str(e)) from None
    feats = image_features(module, features)
    phrases = None
    if module.needs_phrases:
        if clip is None:
            raise node_error(NODE, "clip", "this adapter grounds each subject with its label's CLIP-L embedding; connect the "
                               "checkpoint's CLIP")
        phrases = phrase_embeddings(clip, features.labels)
    ref = next(module.parameters())
    feats = feats.to(device=ref.device, dtype=ref.dtype)
    boxes = torch.tensor(layout.boxes, dtype=ref.dtype, device=ref.device)
    phrases = None if phrases is None else phrases.to(device=ref.device, dtype=ref.dtype)
    with torch.inference_mode():
        tokens = module.subject_tokens(feats, boxes, phrases).float().cpu().clone()
        uncond = None
        if module.semantics == "separate":
            zero = torch.zeros_like(feats)  # IP-Adapter's uncond: zero embeds (base), an encoded zero image (plus)
            encoded_zero = getattr(features, "uncond_penultimate", None)
            if module.image_input == "penultimate" and encoded_zero is not None:
                zero = encoded_zero.to(feats).expand_as(feats)
            uncond = module.subject_tokens(zero, boxes, phrases).float().cpu().clone()
    sampling = model.get_model_object("model_sampling")
    params = dataclasses.replace(params, sigma_start=float(sampling.percent_to_sigma(start_percent)),
                                 sigma_end=float(sampling.percent_to_sigma(end_percent)))
    patch = RegionalAttentionPatch(module, tokens, layout, params, uncond_tokens=uncond,
                                   attention=comfy_attention.optimized_attention,
                                   sigma_to_t=functools.partial(router_time, sampling))
    # an earlier attn2 replace keeps giving the text term; a layout of another aspect than the latent warns
    return lifecycle.install(model, patch, "sdxl", attn2=keys, canvas=(layout.width, layout.height))


def sdxl_report(adapter, features: ClipFeatures, params: RegionalParams) -> str:
    """What TroupeApplySDXL shows: the behaviour it used for this file (README, "Golden parity")."""
    from ..models.sdxl.patch import subject_scale_rule

    module = adapter.module
    keys = layer_keys_for(module, params.blocks)
    lines = [f"{adapter.format}: {len(keys)} of {len(module.layer_keys())} cross-attention layers ({params.blocks})"
             + (" - as trained" if len(keys) == len(module.layer_keys()) else " - fewer than the file was trained with"),
             features.for_crop(module.trained_crop).crop_note(module.trained_crop)
             if getattr(module, "trained_crop", None) else f"crop: {features.crop}"]
    if params.subject_weights:
        rule = subject_scale_rule(module, params)
        lines.append(f"subject weights: {rule}" + (" (as MS-Diffusion)" if rule != "times weight" and
                                                   params.subject_scale == "as trained" else ""))
    if params.layer_weights.strip():
        lines.append(f"layer weights: {params.layer_weights.strip()}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- node


class TroupeApplySDXL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            **aliases("ip-adapter sdxl", "ms-diffusion", "multi subject sdxl", "r3-adapter", "regional ip-adapter"),
            display_name="Troupe Apply SDXL (multi-subject)",
            category=CATEGORY,
            description="Patch a copy of an SDXL model so every subject attends only inside its layout region, in "
                        "one patch for any number of subjects. MS-Diffusion / R^3 files: one joint masked softmax "
                        "over all subjects' tokens; IP-Adapter files: one masked IP-Adapter term per subject.",
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model to patch (a copy is patched, the input is untouched)."),
                types.Adapter.Input("adapter", tooltip="An SDXL adapter from Troupe Load Adapter (MS-Diffusion, R^3, "
                                                       "IP-Adapter SDXL or plus)."),
                types.ClipFeatures.Input("features",
                                         tooltip="The subjects encoded by Troupe Encode Subjects with the CLIP vision "
                                                 "model the adapter expects (MS-Diffusion: bigG; IP-Adapter: ViT-H)."),
                types.Layout.Input("layout", tooltip="One region per subject, in subject order (Troupe Layout)."),
                io.Float.Input("weight", default=0.6, min=0.0, max=5.0, step=0.05,
                               tooltip="Global image scale: out = text + weight * image attention (MS-Diffusion "
                                       "uses 0.6)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which the subjects start acting (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress after which the subjects stop acting (1 = last step)."),
                io.Combo.Input("blocks", options=list(BLOCK_CHOICES), default="all",
                               tooltip="Which cross-attention layers get subject tokens: all (as MS-Diffusion and "
                                       "IP-Adapter were trained), or fewer: down + mid (where R^3 applies its "
                                       "alignment loss), down, mid, up, down + up."),
                io.Combo.Input("routing", options=list(MODES), default="learned",
                               tooltip="How the four token levels are weighted per step: learned (the file's "
                                       "router), static (25% each), manual (the schedule string)."),
                io.String.Input("schedule", default="",
                                tooltip="Manual routing only: the level weights per timestep (format in the README, "
                                        "e.g. '1.0:1,0,0,0; 0.5:0.25,0.25,0.25,0.25; 0.0:0,0,0,1': t = 1 is the "
                                        "first step, structure (base tokens) first, details (T3) last)."),
                io.Boolean.Input("refine", default=True,
                                 tooltip="Use the refined detail levels (R^3 files); off = base tokens only, as "
                                         "MS-Diffusion."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The checkpoint's CLIP: each subject's label is embedded with CLIP-L for the "
                                      "grounding resampler (MS-Diffusion and R^3 files need it)."),
                types.Subjects.Input("subjects", optional=True,
                                     tooltip="Optional: the subject list, to use each subject's weight (default 1)."),
                io.String.Input("layer_weights", default="", optional=True,
                                tooltip="Optional, as IPAdapter_plus' layer_weights: 'index:weight, ...' per "
                                        "transformer module in forward order (0-3 down, 4 mid, 5-10 up), times "
                                        "'weight'; unlisted modules get no subject term. Empty: every layer."),
                io.Combo.Input("subject_weights", options=list(SUBJECT_SCALES), default="as trained", optional=True,
                               tooltip="How each subject's weight meets 'weight': 'as trained' (MS-Diffusion files: "
                                       "the subject weights replace it, as MS-Diffusion does; others: multiply), "
                                       "'times weight', or 'instead of weight (MS-Diffusion)'."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A patched copy of the SDXL model: connect it to the sampler.")],
        )

    @classmethod
    def validate_inputs(cls, blocks: str = "all", routing: str = "learned", subject_weights: str = "as trained",
                        weight: float = 0.6, start_percent: float = 0.0, end_percent: float = 1.0) -> bool | str:
        """At queue time: 0.3.75 checks neither V3 combo values nor the range of an input declared here (no ``**kw``:
        with it ComfyUI skips every input's min/max), and NaN passes any range."""
        for name, value, high in (("weight", weight, 5.0), ("start_percent", start_percent, 1.0),
                                  ("end_percent", end_percent, 1.0)):
            if (problem := number_error(NODE, name, value, 0.0, high)) is not None:
                return problem
        if start_percent > end_percent:
            return error_text(NODE, "end_percent", f"end ({end_percent}) is before start ({start_percent}); set end >= "
                                                   "start")
        if blocks not in BLOCK_CHOICES:
            return error_text(NODE, "blocks", f"expected one of {', '.join(BLOCK_CHOICES)}, got {blocks!r}")
        if routing not in MODES:
            return error_text(NODE, "routing", f"expected one of {', '.join(MODES)}, got {routing!r}")
        if subject_weights not in SUBJECT_SCALES:
            return error_text(NODE, "subject_weights", f"expected one of {', '.join(SUBJECT_SCALES)}, got "
                                                       f"{subject_weights!r}")
        return True

    @classmethod
    def execute(cls, model, adapter, features, layout, weight: float, start_percent: float, end_percent: float,
                blocks: str, routing: str, schedule: str, refine: bool, clip=None, subjects=None,
                layer_weights: str = "", subject_weights: str = "as trained") -> io.NodeOutput:
        if start_percent > end_percent:
            raise node_error(NODE, "end_percent", f"end ({end_percent}) is before start ({start_percent}); set end >= start")
        if routing == "manual" and not schedule.strip():
            raise node_error(NODE, "schedule", "routing is 'manual' but the schedule is empty; write one or pick 'learned'")
        try:
            params = RegionalParams(weight=weight, subject_weights=tuple(s.weight for s in subjects or ()),
                                    blocks=blocks, routing=routing, schedule=schedule.strip() or None,
                                    refine=bool(refine), layer_weights=layer_weights or "",
                                    subject_scale=subject_weights)
        except ValueError as e:
            name = "layer_weights" if "layer weights" in str(e) else "subject_weights"
            raise node_error(NODE, name, str(e)) from None
        patched = apply_sdxl(model, adapter, features, layout, params, clip, start_percent, end_percent)
        return io.NodeOutput(patched, ui=ui.PreviewText(sdxl_report(adapter, features, params)))
