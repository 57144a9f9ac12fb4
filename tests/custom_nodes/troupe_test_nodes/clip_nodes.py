"""TEST-ONLY tiny SDXL CLIP (clip_l + clip_g): ComfyUI's own SDXLClipModel and tokenizer at tiny width."""
from __future__ import annotations

import typing

from comfy_api.latest import io

CATEGORY = "Troupe/testing"


def tiny_text_config(width: int, layers: int = 3) -> dict:
    """CLIPTextModel config overrides: ``width`` wide, ``layers`` deep (>= 3: SDXL reads layer -2), 2 heads."""
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
            "num_hidden_layers": layers, "projection_dim": width}


def tiny_sdxl_clip(seed: int = 0, width_l: int = 32, width_g: int = 32):
    """comfy.sd.CLIP wrapping SDXLClipModel (clip_l width ``width_l``, clip_g ``width_g``), random weights."""
    import comfy.sd
    import comfy.sdxl_clip
    import torch

    class Target:
        params: typing.ClassVar[dict] = {}  # ComfyUI's CLIP target interface: a class attribute
        clip = comfy.sdxl_clip.SDXLClipModel
        tokenizer = comfy.sdxl_clip.SDXLTokenizer

    options = {"clip_l_model_config": tiny_text_config(width_l), "clip_g_model_config": tiny_text_config(width_g),
               "dtype": torch.float32}
    clip = comfy.sd.CLIP(Target(), model_options=options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if "layer_norm" in name or "final_layer_norm" in name:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            elif name.endswith("logit_scale"):
                continue
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, 0.02, generator=gen))
    return clip


class TroupeTestTinySDXLCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTinySDXLCLIP", display_name="Troupe Test Tiny SDXL CLIP", category=CATEGORY,
            description="TEST ONLY. ComfyUI's SDXL text encoder (clip_l + clip_g, ComfyUI's own tokenizer) at tiny "
                        "width with random weights; its text output does not fit the tiny UNet, use it for label "
                        "embeddings.",
            inputs=[
                io.Int.Input("width_l", default=32, min=8, max=1024, step=2,
                             tooltip="Width of clip_l (its unprojected pooled output is the phrase embedding)."),
                io.Int.Input("width_g", default=32, min=8, max=1280, step=2, tooltip="Width of clip_g."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights (same seed, same model)."),
            ],
            outputs=[io.Clip.Output(display_name="clip")],
        )

    @classmethod
    def execute(cls, width_l: int, width_g: int, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_sdxl_clip(seed, width_l, width_g))
