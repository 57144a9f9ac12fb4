"""TroupeApplyFLUX: the FLUX multi-subject adapter (DynaIP, 004) on a clone of a FLUX model."""
from __future__ import annotations

from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import torch
from comfy_api.latest import io, ui

from ..models.adapter_file import Adapter
from ..models.encoding.reference_features import ClipFeatures
from ..models.flux.adapter import INSTANTX, XLABS
from ..models.flux.injection import AS_TRAINED, DDS_MODES, InjectionParams, resolve_dds
from ..models.flux.patch import FluxInjection, check_model_fits
from ..models.layout.layout import Layout
from . import lifecycle, types
from .errors import error_text, node_error, number_error
from .search import aliases

CATEGORY = "Troupe/apply"
NODE = "TroupeApplyFLUX"


@dataclass(frozen=True)
class ApplySettings:
    """The node's scalar inputs."""

    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    branches: str = AS_TRAINED



def adapter_inputs(adapter: Adapter, features: ClipFeatures) -> torch.Tensor:
    """What the adapter's image projection reads: encoder tokens [N, G, E] (ours) or pooled [N, P] (InstantX).

    InstantX was trained on SigLIP's attention-pooled output: TroupeEncodeSubjects computes it with the pooling head
    of the user's SigLIP file (``features.pooled``); without that head, ComfyUI's post-layernorm tokens averaged.
    """
    want = adapter.module.config.encoder_dim
    if adapter.format in (INSTANTX, XLABS):
        name, encoder = ("InstantX", "SigLIP so400m 384") if adapter.format == INSTANTX else ("XLabs", "CLIP ViT-L/14")
        pooled = features.pooled if adapter.format == INSTANTX and features.pooled is not None else \
            features.image_embeds
        if pooled is None:
            raise node_error(NODE, "features", f"the {name} adapter needs the encoder's pooled output (width {want}, {encoder}), "
                                   f"but these features have none; encode with the {encoder} vision model")
        if pooled.ndim == 3:
            pooled = pooled.mean(1)
        if pooled.shape[-1] != want:
            raise node_error(NODE, "features", f"the {name} adapter reads pooled embeddings of width {want} ({encoder}), these "
                                   f"have width {pooled.shape[-1]} ({features.encoder}); encode the subjects with "
                                   "the vision model the adapter was trained with")
        return pooled
    tokens = features.tokens()
    if tokens.shape[-1] != want:
        source = "fused HMoE tokens" if features.fused is not None else f"layer {features.layers[-1]} tokens"
        raise node_error(NODE, "features", f"the adapter reads tokens of width {want} but these {source} have width "
                               f"{tokens.shape[-1]} ({features.encoder}); use the CLIP vision model and fusion "
                               "weights the adapter was trained with")
    return tokens


def apply_flux(model, adapter: Adapter, features: ClipFeatures, settings: ApplySettings,
               subjects=None, layout: Layout | None = None):
    """A clone of ``model`` whose double and single blocks run DDS + Eq. 9 of 004 for every subject."""
    if not isinstance(adapter, Adapter) or adapter.family != "flux":
        fam = getattr(adapter, "family", type(adapter).__name__)
        raise node_error(NODE, "adapter", f"expected a FLUX adapter from TroupeLoadAdapter, got a {fam} one; load a FLUX "
                              "adapter file (troupe-flux, InstantX or XLabs FLUX IP-Adapter)")
    if settings.branches not in DDS_MODES:
        raise node_error(NODE, "branches", f"expected one of {', '.join(DDS_MODES)}, got {settings.branches!r}")
    features = features.for_crop(adapter.module.trained_crop)  # the crop geometry this file was trained with
    if not 0.0 <= settings.start_percent <= settings.end_percent <= 1.0:
        raise node_error(NODE, "start_percent", f"need 0 <= start_percent <= end_percent <= 1, got {settings.start_percent} and "
                                    f"{settings.end_percent}")
    n = features.num_subjects
    weights: tuple[float, ...] = (1.0,) * n
    if subjects is not None:
        if len(subjects) != n:
            raise node_error(NODE, "subjects", f"{len(subjects)} subjects but the features hold {n}; connect the same subject "
                                   "list that was encoded")
        weights = tuple(float(s.weight) for s in subjects)
    if layout is not None and len(layout) != n:
        raise node_error(NODE, "layout", f"the layout has {len(layout)} regions but there are {n} subjects; draw one box per "
                             "subject (region i = subject i)")
    diffusion_model = model.get_model_object("diffusion_model")
    try:
        nd, ns = check_model_fits(adapter.module, diffusion_model)
    except ValueError as e:
        raise node_error(NODE, "model", str(e)) from None
    inputs = adapter_inputs(adapter, features)
    sampling = model.get_model_object("model_sampling")
    params = InjectionParams(weight=settings.weight, subject_weights=weights,
                             sigma_start=float(sampling.percent_to_sigma(settings.start_percent)),
                             sigma_end=float(sampling.percent_to_sigma(settings.end_percent)),
                             dds=resolve_dds(settings.branches, adapter.format))
    tokens = adapter.module.reference_tokens(inputs)  # once per apply: it does not depend on the timestep
    flipped = any(getattr(b, "flipped_img_txt", False) for b in diffusion_model.double_blocks)
    injection = FluxInjection(adapter.module, tokens, params, layout, nd, getattr(diffusion_model, "patch_size", 2),
                              flipped_img_txt=flipped, attention=comfy_attention.optimized_attention)
    blocks = [("double_block", i) for i in range(nd)] + [("single_block", i) for i in range(ns)]  # XLabs: ns = 0
    # a replace patch already at a block (the reference branch, another Apply) keeps running, inside ours
    canvas = None if layout is None else (layout.width, layout.height)  # warns at sampling if the aspect differs
    return lifecycle.install(model, injection, "flux", dit=blocks, diffusion_model=True, canvas=canvas)


class TroupeApplyFLUX(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            **aliases("ip-adapter flux", "dynaip", "instantx", "xlabs", "multi subject flux"),
            display_name="Troupe Apply FLUX (DynaIP)",
            category=CATEGORY,
            description="Inject every subject into a FLUX model through an image cross-attention in each double "
                        "and single block (DynaIP): each subject only inside its layout region (Eq. 9), only on "
                        "the image tokens by default (Dynamic Decoupling Strategy). Returns a patched copy; the "
                        "input model is unchanged. Works with FLUX.1 dev (guidance) and schnell, and with real CFG "
                        "(the negative pass gets no subject features).",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 dev or schnell model (Load Diffusion Model)."),
                types.Adapter.Input("adapter", tooltip="A FLUX adapter from Troupe Load Adapter (troupe-flux, the "
                                                       "InstantX FLUX.1-dev IP-Adapter or XLabs' FLUX IP-Adapter)."),
                types.ClipFeatures.Input("features",
                                         tooltip="The subjects' features from Troupe Encode Subjects: fused HMoE "
                                                 "tokens (or the high layer) for troupe-flux; SigLIP for InstantX; "
                                                 "CLIP ViT-L/14 for XLabs."),
                io.Float.Input("weight", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Global lambda: multiplies every subject's weight (0 = the base model)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Inject from this fraction of the sampling schedule on (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Stop injecting after this fraction of the schedule (1 = last step)."),
                io.Combo.Input("branches", options=list(DDS_MODES), default=AS_TRAINED,
                               tooltip="Which tokens get the subject term. 'as trained': the file's own rule "
                                       "(DynaIP and XLabs files: image tokens only; InstantX: image tokens in "
                                       "double blocks, the whole stream in single blocks). 'image branch only' "
                                       "(DynaIP's Dynamic Decoupling inference rule), 'both branches' (text tokens "
                                       "too, as DynaIP trains; Fig. 15), 'whole stream in single blocks "
                                       "(InstantX)'."),
                types.Subjects.Input("subjects", optional=True,
                                     tooltip="The encoded subject list: their weights scale each subject "
                                             "(lambda_i); without it every subject has weight 1."),
                types.Layout.Input("layout", optional=True,
                                   tooltip="One region per subject (region i = subject i); without a layout every "
                                           "subject is injected over the whole image."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A patched copy of the FLUX model: connect it to the sampler.")],
        )

    @classmethod
    def validate_inputs(cls, branches: str = AS_TRAINED, weight: float = 1.0, start_percent: float = 0.0,
                        end_percent: float = 1.0) -> bool | str:
        """At queue time: 0.3.75 checks neither V3 combo values nor the range of an input declared here; NaN passes
        any range."""
        for name, value, high in (("weight", weight, 5.0), ("start_percent", start_percent, 1.0),
                                  ("end_percent", end_percent, 1.0)):
            if (problem := number_error(NODE, name, value, 0.0, high)) is not None:
                return problem
        if start_percent > end_percent:
            return error_text(NODE, "end_percent", f"end ({end_percent}) is before start ({start_percent}); set end >= "
                                                   "start")
        if branches in DDS_MODES:
            return True
        return error_text(NODE, "branches", f"expected one of {', '.join(DDS_MODES)}, got {branches!r}")

    @classmethod
    def execute(cls, model, adapter, features, weight: float, start_percent: float, end_percent: float,
                branches: str, subjects=None, layout=None) -> io.NodeOutput:
        settings = ApplySettings(weight, start_percent, end_percent, branches)
        patched = apply_flux(model, adapter, features, settings, subjects, layout)
        return io.NodeOutput(patched, ui=ui.PreviewText(flux_report(adapter, features, settings)))


def flux_report(adapter: Adapter, features: ClipFeatures, settings: ApplySettings) -> str:
    """What TroupeApplyFLUX shows: the injection rule, crop and pooled input it used for this file."""
    rule = resolve_dds(settings.branches, adapter.format)
    lines = [f"{adapter.format}: {rule}" + (" (as trained)" if settings.branches == AS_TRAINED else ""),
             features.for_crop(adapter.module.trained_crop).crop_note(adapter.module.trained_crop)]
    if adapter.format == INSTANTX:
        lines.append("pooled input: " + (features.pooled_source or "image_embeds (not a SigLIP encoding)"))
    return "\n".join(lines)
