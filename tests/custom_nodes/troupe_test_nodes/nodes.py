"""TroupeTest* nodes: thin wrappers over tests/fixtures/tiny_models.py (test-only, never shipped)."""
from __future__ import annotations

import json

from comfy_api.latest import ComfyExtension, io, ui

from . import cache
from .aligngen_nodes import TroupeTestTinyAlignGen
from .clip_nodes import TroupeTestTinySDXLCLIP
from .describe import describe
from .redux_nodes import TroupeTestTinyRedux
from .tensor_nodes import TroupeTestHeld, TroupeTestTensor

CATEGORY = "Troupe/testing"
LATENT_CHANNELS = {"sdxl": 4, "flux": 16}


def _seed(tooltip: str = "Seed of the random weights (same seed, same model).") -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip=tooltip)


class TroupeTestTinySDXL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTinySDXL", display_name="Troupe Test Tiny SDXL", category=CATEGORY,
            description="TEST ONLY. SDXL-structured UNet with random weights (32 channels, one transformer "
                        "block at input 4,5,7,8, middle, output 0-5; context 2048, adm 2816).",
            inputs=[_seed()],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(cache.sdxl(seed))


class TroupeTestTinyFLUX(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTinyFLUX", display_name="Troupe Test Tiny FLUX", category=CATEGORY,
            description="TEST ONLY. FLUX-structured DiT with random weights (hidden 64, 2 heads, 2 double + "
                        "2 single blocks, T5 4096 / pooled 768, 16 latent channels).",
            inputs=[
                io.Boolean.Input("schnell", default=False,
                                 tooltip="Schnell-shaped (no guidance embedding, FLOW shift 1) instead of dev."),
                _seed(),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, schnell: bool, seed: int) -> io.NodeOutput:
        return io.NodeOutput(cache.flux(bool(schnell), seed))


class TroupeTestTinyCLIPVision(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTinyCLIPVision", display_name="Troupe Test Tiny CLIP Vision", category=CATEGORY,
            description="TEST ONLY. CLIP vision tower in ViT-L/14 geometry (224 px, 257 tokens) at width 64 "
                        "with random weights; a real ComfyUI CLIP_VISION object.",
            inputs=[
                io.Int.Input("layers", default=24, min=1, max=48,
                             tooltip="Number of transformer layers (ViT-L/14 has 24, ViT-H 32, bigG 48)."),
                _seed(),
            ],
            outputs=[io.ClipVision.Output(display_name="clip_vision")],
        )

    @classmethod
    def execute(cls, layers: int, seed: int) -> io.NodeOutput:
        return io.NodeOutput(cache.clip_vision(layers, seed))


class TroupeTestTinyDINOv2(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTinyDINOv2", display_name="Troupe Test Tiny DINOv2", category=CATEGORY,
            description="TEST ONLY. ComfyUI's DINOv2 (518 px, 1370 tokens) at width 64 with random weights, "
                        "as a CLIP_VISION object.",
            inputs=[
                io.Int.Input("layers", default=6, min=1, max=40, tooltip="Number of transformer layers."),
                _seed(),
            ],
            outputs=[io.ClipVision.Output(display_name="clip_vision")],
        )

    @classmethod
    def execute(cls, layers: int, seed: int) -> io.NodeOutput:
        return io.NodeOutput(cache.dinov2(layers, seed))


class TroupeTestTinyVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTinyVAE", display_name="Troupe Test Tiny VAE", category=CATEGORY,
            description="TEST ONLY. KL VAE in the SD layout (8x down) at 32 channels with random weights.",
            inputs=[
                io.Combo.Input("kind", options=list(LATENT_CHANNELS), default="sdxl",
                               tooltip="sdxl: 4 latent channels; flux: 16 latent channels."),
                _seed(),
            ],
            outputs=[io.Vae.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, kind: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(cache.vae(LATENT_CHANNELS[kind], seed))


class TroupeTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestConditioning", display_name="Troupe Test Conditioning", category=CATEGORY,
            description="TEST ONLY. Random text embeddings with the dimensions of SDXL (context 2048, pooled "
                        "1280, size) or FLUX (T5 4096, pooled 768, guidance), since no text encoder exists.",
            inputs=[
                _seed("Seed of the random embeddings (use different seeds for positive and negative)."),
                io.Combo.Input("kind", options=list(LATENT_CHANNELS), default="sdxl",
                               tooltip="Which model's conditioning layout to produce."),
                io.Int.Input("batch", default=1, min=1, max=16, tooltip="Batch size of the embeddings."),
                io.Int.Input("width", default=1024, min=16, max=8192, step=8,
                             tooltip="SDXL size conditioning (pixels); ignored for FLUX."),
                io.Int.Input("height", default=1024, min=16, max=8192, step=8,
                             tooltip="SDXL size conditioning (pixels); ignored for FLUX."),
                io.Int.Input("tokens", default=77, min=1, max=512,
                             tooltip="Text length: 77 for SDXL (CLIP), 256 or 512 for FLUX (T5)."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="FLUX distilled guidance (like FluxGuidance); ignored for SDXL."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, seed: int, kind: str, batch: int, width: int, height: int, tokens: int,
                guidance: float) -> io.NodeOutput:
        tm = cache.tiny_models()
        if kind == "sdxl":
            return io.NodeOutput(tm.sdxl_conditioning(seed=seed, batch=batch, width=width, height=height,
                                                      tokens=tokens))
        return io.NodeOutput(tm.flux_conditioning(seed=seed, batch=batch, tokens=tokens, guidance=guidance))


class TroupeTestInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestInspect", display_name="Troupe Test Inspect", category=CATEGORY,
            description="TEST ONLY. Output node: a JSON summary of any value (tensor shapes, dtypes, stats; "
                        "dict and list structure; a MODEL's patches) in the history's ui text.",
            inputs=[io.AnyType.Input("value", tooltip="Any value, e.g. CLIP_VISION_OUTPUT or CONDITIONING.")],
            outputs=[io.String.Output(display_name="json")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, value) -> io.NodeOutput:
        text = json.dumps(describe(value), indent=1)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES: list[type[io.ComfyNode]] = [
    TroupeTestTinySDXL, TroupeTestTinyFLUX, TroupeTestTinyCLIPVision, TroupeTestTinyDINOv2, TroupeTestTinyVAE,
    TroupeTestConditioning, TroupeTestInspect, TroupeTestTinySDXLCLIP, TroupeTestTinyRedux, TroupeTestTensor,
    TroupeTestHeld, TroupeTestTinyAlignGen,
]


class TroupeTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
