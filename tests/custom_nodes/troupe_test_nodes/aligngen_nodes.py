"""TroupeTestTinyAlignGen: the tiny FLUX a trained aligngen S* / DEM runs on, in the server (test only).

The tiny FLUX text encoders of tests/fixtures/training_flux.py (CLIP-L 768 + a 2-layer T5 64 wide, the same seeded
weights) with ComfyUI's embeddings folders (as DualCLIPLoader gives them), the tiny FLUX DiT whose text width is 64,
and a Redux-shaped style model (vision width 32 -> 64) with a 729-token SigLIP-384-shaped vision output.
"""
from __future__ import annotations

import functools
import typing

import torch
from comfy_api.latest import io

from . import cache
from .clip_nodes import tiny_text_config

CATEGORY = "Troupe/testing"
T5_WIDTH = 64  # tests/fixtures/training_flux.py


@functools.cache
def tiny_flux_t5_clip(seed: int):
    import comfy.sd
    import comfy.text_encoders.flux
    import folder_paths

    class Target:
        params: typing.ClassVar[dict] = {}
        clip = comfy.text_encoders.flux.flux_clip()
        tokenizer = comfy.text_encoders.flux.FluxTokenizer

    t5 = {"d_model": T5_WIDTH, "d_ff": 2 * T5_WIDTH, "d_kv": T5_WIDTH // 2, "num_heads": 2, "num_layers": 2}
    options = {"clip_l_model_config": tiny_text_config(768), "t5xxl_model_config": t5, "dtype": torch.float32}
    clip = comfy.sd.CLIP(Target(), embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         model_options=options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # tests/fixtures/training_flux.py's tiny_flux_clip initialisation
        for name, p in clip.cond_stage_model.named_parameters():
            if "layer_norm" in name or name.endswith(".weight") and "norm" in name.lower():
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            elif name.endswith("logit_scale"):
                continue
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, 0.02, generator=gen))
    return clip


@functools.cache
def tiny_flux_t5_dit(seed: int):
    import comfy.supported_models

    tm = cache.tiny_models()
    cfg = comfy.supported_models.Flux(tm.flux_dit_config(dict(tm.TINY_FLUX_DIT, context_in_dim=T5_WIDTH)))
    return tm._diffusion_patcher(cfg, seed, None)


class TroupeTestTinyAlignGen(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTinyAlignGen", display_name="Troupe Test Tiny AlignGen", category=CATEGORY,
            description="TEST ONLY. The tiny FLUX DiT with T5 width 64, the tiny FLUX CLIP (T5 64 wide, embeddings "
                        "from models/embeddings), a Redux-shaped STYLE_MODEL (32 -> 64) and a 729-token "
                        "CLIP_VISION_OUTPUT, all random from the seed.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the Redux tokens.")],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.StyleModel.Output(display_name="style_model"),
                     io.ClipVisionOutput.Output(display_name="clip_vision_output")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        import comfy.clip_vision
        import comfy.sd

        gen = torch.Generator().manual_seed(seed)
        proj = torch.nn.Linear(32, T5_WIDTH)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(T5_WIDTH, 32, generator=gen) * 0.1)
            proj.bias.zero_()
        out = comfy.clip_vision.Output()
        out["last_hidden_state"] = torch.randn(1, 729, 32, generator=gen)
        return io.NodeOutput(tiny_flux_t5_dit(1), tiny_flux_t5_clip(0), comfy.sd.StyleModel(proj.eval()), out)
