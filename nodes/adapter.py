"""TroupeLoadAdapter: one loader for every adapter family (SDXL and FLUX) in models/troupe."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..models.adapter_file import AdapterFamily, AdapterFormatError, detect_and_load, read_state_dict
from . import paths, types
from .errors import node_error

CATEGORY = "Troupe/adapters"
NODE = "TroupeLoadAdapter"


def families() -> list[AdapterFamily]:
    """The adapter families the loader asks, in order (each module exposes ``FAMILY``)."""
    found: list[AdapterFamily] = []
    # each family adds its module here: `from ..models import <module>`; found.append(<module>.FAMILY)
    from ..models.sdxl import formats as sdxl_formats

    found.append(sdxl_formats.FAMILY)
    from ..models.flux import adapter as flux_adapter

    found.append(flux_adapter.FAMILY)
    return found


def load_adapter(name: str):
    path = folder_paths.get_full_path_or_raise("troupe", name)
    try:
        return detect_and_load(read_state_dict(path), families(), filename=name)
    except AdapterFormatError as e:
        raise node_error(NODE, "adapter_name", f"{name}: {e}") from None


class TroupeLoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Troupe Load Adapter",
            category=CATEGORY,
            description="Load a multi-subject adapter from models/troupe and report what it found (format, base "
                        "model, subjects supported, token counts). Formats: see the README.",
            inputs=[io.Combo.Input("adapter_name", options=paths.list_files("troupe"),
                                   tooltip="An adapter file in ComfyUI/models/troupe (.safetensors, or a .bin "
                                           "read safely with weights_only).")],
            outputs=[types.Adapter.Output(display_name="adapter")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, adapter_name: str) -> bool | str:
        """At queue time: 0.3.75 does not check V3 combo values itself."""
        return paths.check_listed(NODE, "adapter_name", "troupe", adapter_name, "adapter file")

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        adapter = load_adapter(adapter_name)
        return io.NodeOutput(adapter, ui=ui.PreviewText(adapter.summary()))
