"""TroupeLoadAdapter: one loader for every adapter family (SDXL and FLUX) in models/troupe and the IP-Adapter folders."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..models.adapter_file import AdapterFamily, AdapterFormatError, detect_and_load, read_state_dict
from . import paths, types
from .errors import node_error
from .search import aliases

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
    path = paths.full_path(NODE, "adapter_name", paths.ADAPTER_FOLDERS, name)
    try:
        return detect_and_load(read_state_dict(path), families(), filename=name)
    except AdapterFormatError as e:
        raise node_error(NODE, "adapter_name", f"{name}: {e}") from None


class TroupeLoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            **aliases("ip-adapter", "ipadapter", "ms-diffusion", "instantx", "xlabs", "r3-adapter"),
            display_name="Troupe Load Adapter",
            category=CATEGORY,
            description="Load a multi-subject adapter (MS-Diffusion, IP-Adapter SDXL, InstantX or XLabs FLUX, "
                        "Troupe's R^3 / FLUX files) and report what it found (format, base model, subjects "
                        "supported, token counts).",
            inputs=[io.Combo.Input("adapter_name", options=paths.choices(paths.ADAPTER_FOLDERS),
                                   tooltip="An adapter file in ComfyUI/models/troupe, models/ipadapter, "
                                           "models/ipadapter-flux or models/xlabs/ipadapters (.safetensors, or a "
                                           ".bin read safely with weights_only). A name found in two folders "
                                           "shows its folder.")],
            outputs=[types.Adapter.Output(display_name="adapter",
                                          tooltip="The loaded adapter: connect it to TroupeApplySDXL or "
                                                  "TroupeApplyFLUX.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, adapter_name: str) -> bool | str:
        """At queue time: 0.3.75 does not check V3 combo values itself."""
        return paths.check_listed_in(NODE, "adapter_name", paths.ADAPTER_FOLDERS, adapter_name, "adapter file")

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        adapter = load_adapter(adapter_name)
        return io.NodeOutput(adapter, ui=ui.PreviewText(adapter.summary()))
