"""TroupeTestTensor: an IMAGE and a MASK of any shape and content, for the bad-input table (test only)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

CATEGORY = "Troupe/testing"
FILLS = ("noise", "nan", "inf", "zero", "one")


class TroupeTestTensor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestTensor", display_name="Troupe Test Tensor", category=CATEGORY,
            description="TEST ONLY. IMAGE [batch, height, width, channels] and MASK [batch, height, width] filled "
                        "with seeded noise in [0, 1], NaN at one pixel, inf at one pixel, zeros or ones.",
            inputs=[io.Int.Input("width", default=64, min=1, max=8192, tooltip="Width in pixels."),
                    io.Int.Input("height", default=64, min=1, max=8192, tooltip="Height in pixels."),
                    io.Int.Input("channels", default=3, min=1, max=8, tooltip="IMAGE channels (3 = RGB, 4 = RGBA)."),
                    io.Int.Input("batch", default=1, min=1, max=16, tooltip="Batch size."),
                    io.Combo.Input("fill", options=list(FILLS), default="noise", tooltip="The content."),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the noise.")],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, width: int, height: int, channels: int, batch: int, fill: str, seed: int) -> io.NodeOutput:
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(batch, height, width, channels, generator=g)
        mask = torch.rand(batch, height, width, generator=g)
        if fill in ("zero", "one"):
            image.fill_(float(fill == "one"))
            mask.fill_(float(fill == "one"))
        elif fill in ("nan", "inf"):
            image[:, height // 2, width // 2] = float(fill)
            mask[:, height // 2, width // 2] = float(fill)
        return io.NodeOutput(image, mask)


class TroupeTestHeld(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeTestHeld", display_name="Troupe Test Held Objects", category=CATEGORY,
            description="TEST ONLY. Output node: after a gc, the number of live objects whose class comes from the "
                        "Troupe pack (its models/ and nodes/ modules), per class, and the process' resident memory.",
            inputs=[io.Int.Input("nonce", default=0, min=0, max=2**31 - 1, tooltip="Change it to run again."),
                    io.AnyType.Input("value", optional=True,
                                     tooltip="Anything to keep alive while counting (shows the count works).")],
            outputs=[io.String.Output(display_name="json")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, nonce: int, value=None) -> io.NodeOutput:
        import gc
        import json

        gc.collect()
        counts: dict[str, int] = {}
        for obj in gc.get_objects():
            module = getattr(type(obj), "__module__", None)
            if not isinstance(module, str):  # some extension types carry a descriptor there
                continue
            if "Troupe" in module and "troupe_test_nodes" not in module and (".models." in module or ".nodes." in module):
                name = f"{module}.{type(obj).__qualname__}"
                counts[name] = counts.get(name, 0) + 1
        rss = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        text = json.dumps({"objects": counts, "rss": rss})
        return io.NodeOutput(text, ui={"text": [text]})
