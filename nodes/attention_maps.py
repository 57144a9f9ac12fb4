"""TroupeAttentionMaps and TroupeAttentionMapsRender: where each subject's tokens were attended, over the image."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..evaluation.attention_maps import label_frames, render_attention_maps
from ..models.attention_record import BLOCK_CHOICES, Recording, RecordSettings
from . import lifecycle, types
from .errors import node_error

CATEGORY = "Troupe/evaluation"
NODE, RENDER = "TroupeAttentionMaps", "TroupeAttentionMapsRender"


def record_attention(model, blocks: str, start_percent: float, end_percent: float):
    """A clone of ``model`` that records the attention maps of its Troupe patches, and the recording handle."""
    if start_percent > end_percent:
        raise node_error(NODE, "end_percent", f"the step range is empty (start {start_percent} > end {end_percent});"
                         " set end_percent to at least start_percent")
    sampling = model.get_model_object("model_sampling")
    settings = RecordSettings(blocks=blocks, sigma_start=float(sampling.percent_to_sigma(start_percent)),
                              sigma_end=float(sampling.percent_to_sigma(end_percent)))
    recording = Recording(settings)
    return lifecycle.install_recorder(model, recording), recording


def attention_maps(image: torch.Tensor, recording: Recording, subjects=None) -> torch.Tensor:
    """The heat-maps of the latest finished run of ``recording`` over ``image`` (see render_attention_maps), titled
    with the subjects' labels when ``subjects`` is given."""
    recorder = recording.last
    if recorder is None:
        raise node_error(RENDER, "recording", "no sampling run with TroupeAttentionMaps' model has finished; sample "
                         "with that model and connect the image decoded from that sampler")
    maps = recorder.maps(int(image.shape[1]), int(image.shape[2]))
    if maps is None:
        raise node_error(RENDER, "recording", "the sampled model had no Troupe patch attending in the chosen blocks "
                         "and steps (nothing was recorded); put TroupeAttentionMaps after TroupeApplySDXL, "
                         "TroupeApplyFLUX or TroupeReferenceBranch, or widen blocks / the step range")
    if maps.shape[0] != image.shape[0]:
        if maps.shape[0] != 1:
            raise node_error(RENDER, "image", f"{image.shape[0]} images but the last run sampled {maps.shape[0]}; "
                             "connect the images decoded from that run")
        maps = maps.expand(image.shape[0], -1, -1, -1)
    if subjects is not None and len(subjects) != maps.shape[1]:
        raise node_error(RENDER, "subjects", f"{len(subjects)} subjects but the run recorded {maps.shape[1]}; connect "
                         "the subjects you generated with, or leave it empty")
    frames = render_attention_maps(image, maps)
    if subjects is None:
        return frames
    return label_frames(frames, [s.label or f"subject {i + 1}" for i, s in enumerate(subjects)])


class TroupeAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Troupe Attention Maps (record)",
            category=CATEGORY,
            description="Records, while sampling, how much attention each image token gives to each subject's "
                        "tokens in the Troupe patches of this model (SDXL joint and separate, FLUX DynaIP, the FLUX "
                        "reference branch), averaged "
                        "over the chosen blocks and steps. Sample with the model output, then give the decoded image "
                        "and the recording to TroupeAttentionMapsRender. Recording changes no output pixel.",
            inputs=[
                io.Model.Input("model", tooltip="A model with Troupe patches (after TroupeApplySDXL, TroupeApplyFLUX or "
                                                "TroupeReferenceBranch)."),
                io.Combo.Input("blocks", options=list(BLOCK_CHOICES), default="all",
                               tooltip="Which attention layers are averaged: SDXL UNet parts (down, mid, up) or FLUX "
                                       "block kinds (double, single); 'all' for every patched layer."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step recorded, as a fraction of the schedule (0 = the first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Last step recorded, as a fraction of the schedule (1 = the last step)."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A clone of the model that records its Troupe patches' attention while "
                                             "it samples (the same images as the input model)."),
                     types.AttentionRecording.Output(display_name="recording",
                                                     tooltip="The handle to give TroupeAttentionMapsRender: the "
                                                             "maps of the latest finished sampling run of this model.")],
        )

    @classmethod
    def execute(cls, model, blocks: str, start_percent: float, end_percent: float) -> io.NodeOutput:
        return io.NodeOutput(*record_attention(model, blocks, start_percent, end_percent))


class TroupeAttentionMapsRender(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=RENDER,
            display_name="Troupe Attention Maps (render)",
            category=CATEGORY,
            description="One heat-map per subject over the decoded image (where its tokens were attended; one scale "
                        "per image) and an argmax map in the layout's colours (which subject got the most attention "
                        "at each pixel, black for none), from the latest finished sampling run of the recording.",
            inputs=[
                io.Image.Input("image", tooltip="The image decoded from the sampler that used TroupeAttentionMaps' "
                                                "model (it also makes this node run after that sampler)."),
                types.AttentionRecording.Input("recording", tooltip="The recording output of TroupeAttentionMaps."),
                types.Subjects.Input("subjects", optional=True,
                                     tooltip="Optional: the subjects you generated with; their labels title the "
                                             "heat-maps (subject i is region i)."),
            ],
            outputs=[io.Image.Output(display_name="maps",
                                     tooltip="Per image: one heat-map per subject (its attention mass over the image, "
                                             "one scale per image), then the argmax-subject map.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, recording, subjects=None) -> io.NodeOutput:
        maps = attention_maps(image, recording, subjects)
        return io.NodeOutput(maps, ui=ui.PreviewImage(maps, cls=cls))
