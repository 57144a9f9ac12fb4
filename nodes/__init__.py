"""ComfyUI node classes of ComfyUI-Troupe (thin wrappers over models/)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .adapter import TroupeLoadAdapter
from .attention_maps import TroupeAttentionMaps, TroupeAttentionMapsRender
from .dino import TroupeEncodeDINO
from .encoding import TroupeEncodeSubjects, TroupeFusionWeightsPreview, TroupeGranularity, TroupeLoadFusion
from .fidelity import TroupeFidelity
from .flux import TroupeApplyFLUX
from .image_text import TroupeImageTextCLIP, TroupeLoadOpenCLIP
from .layout import TroupeLayout, TroupeLayoutFromMasks, TroupeLayoutPreview, TroupeLayoutToMasks
from .paths import register_model_folders
from .reference_branch import TroupeAttentionMaskPreview, TroupeReferenceBranch
from .sdxl import TroupeApplySDXL
from .sdxl_routing import TroupeRoutingPreview
from .subjects import TroupeSubject, TroupeSubjectList
from .train import TroupeTrainAdapter

NODES: list[type[io.ComfyNode]] = [
    TroupeSubject,
    TroupeSubjectList,
    TroupeLayout,
    TroupeLayoutFromMasks,
    TroupeLayoutToMasks,
    TroupeLayoutPreview,
    TroupeLoadFusion,
    TroupeEncodeSubjects,
    TroupeGranularity,
    TroupeFusionWeightsPreview,
    TroupeEncodeDINO,
    TroupeLoadAdapter,
    TroupeApplyFLUX,
    TroupeRoutingPreview,
    TroupeApplySDXL,
    TroupeReferenceBranch,
    TroupeAttentionMaskPreview,
    TroupeLoadOpenCLIP,
    TroupeImageTextCLIP,
    TroupeFidelity,
    TroupeAttentionMaps,
    TroupeAttentionMapsRender,
    TroupeTrainAdapter,
]


class TroupeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folders()
        return list(NODES)
