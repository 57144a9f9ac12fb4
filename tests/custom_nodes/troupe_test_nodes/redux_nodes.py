"""TroupeTestTinyRedux: a FLUX Redux style model and a SigLIP-384-shaped vision output at tiny size (test only)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

CATEGORY = "Troupe/testing"


class TroupeTestTinyRedux(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTinyRedux", display_name="Troupe Test Tiny Redux", category=CATEGORY,
            description="TEST ONLY. A Redux-shaped STYLE_MODEL (one Linear, vision width 32 -> T5 width 4096) and a "
                        "CLIP_VISION_OUTPUT of 729 SigLIP-384 patch tokens, random from the seed; feed both to "
                        "ComfyUI's StyleModelApply.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random tokens.")],
            outputs=[io.StyleModel.Output(display_name="style_model"),
                     io.ClipVisionOutput.Output(display_name="clip_vision_output")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        import comfy.clip_vision
        import comfy.sd

        gen = torch.Generator().manual_seed(seed)
        proj = torch.nn.Linear(32, 4096)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(4096, 32, generator=gen) * 0.1)
            proj.bias.zero_()
        out = comfy.clip_vision.Output()
        out["last_hidden_state"] = torch.randn(1, 729, 32, generator=gen)
        return io.NodeOutput(comfy.sd.StyleModel(proj.eval()), out)
