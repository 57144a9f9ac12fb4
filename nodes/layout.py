"""Layout nodes: the box editor, masks in and out, and the preview."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..models.layout.layout import (
    EDGE_MODES,
    OVERLAP_POLICIES,
    Layout,
    LayoutError,
    Region,
    default_boxes,
    layout_from_json,
    layout_from_masks,
    parse_layout_json,
)
from ..models.layout.preview import draw_layout, draw_masks
from . import types
from .errors import error_text, node_error
from .search import aliases

EMPTY_LAYOUT = '{"version": 1, "boxes": []}'
CATEGORY = "Troupe/layout"



def build_layout(width: int, height: int, boxes: str, subjects=None) -> Layout:
    """Parse the editor's JSON into a layout; labels come from the subjects when connected."""
    layout = layout_from_json(boxes, width, height)
    if not len(layout):
        if not subjects:
            raise LayoutError("no boxes and no subjects: connect the subject list (the boxes are then placed side "
                              "by side), or draw one box per subject on the canvas (drag with the mouse)")
        layout = Layout(width, height, tuple(Region(box=b) for b in default_boxes(len(subjects), width, height)))
    if subjects is not None:
        if len(subjects) != len(layout):
            raise LayoutError(
                f"{len(layout)} boxes but {len(subjects)} subjects; draw exactly one box per subject "
                "(box i is subject i)"
            )
        layout = layout.with_labels([s.label for s in subjects])
    return layout


class TroupeLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeLayout",
            **aliases("box editor", "bounding boxes", "regional layout", "multi subject layout", "regions"),
            display_name="Troupe Layout (box editor)",
            category=CATEGORY,
            description=(
                "Draw one box per subject on a canvas of width x height. Drag on empty canvas to draw, "
                "drag a box to move it, drag a corner to resize, right-click (or select + Delete) to delete. "
                "Box i places subject i. Boxes snap to the 8-pixel latent grid. With no boxes drawn, the "
                "connected subjects are placed in equal columns over the middle of the canvas (auto layout)."
            ),
            inputs=[
                io.Int.Input("width", default=1024, min=64, max=8192, step=8,
                             tooltip="Canvas width in pixels: use the width of the image you will generate."),
                io.Int.Input("height", default=1024, min=64, max=8192, step=8,
                             tooltip="Canvas height in pixels: use the height of the image you will generate."),
                io.String.Input("boxes", default=EMPTY_LAYOUT, multiline=True,
                                tooltip="The boxes as JSON (written by the canvas editor): "
                                        '{"version": 1, "boxes": [{"x0", "y0", "x1", "y1"} in 0..1]}.'),
                types.Subjects.Input("subjects", optional=True,
                                     tooltip="Optional: the subject list, to label each box with its subject's "
                                             "concept word and check there is one box per subject."),
            ],
            outputs=[types.Layout.Output(display_name="layout",
                                         tooltip="The subject regions (region i = subject i), for the adapters, "
                                                 "the reference branch, masks and the preview.")],
        )

    @classmethod
    def validate_inputs(cls, boxes) -> bool | str:
        if boxes is None:  # linked from another node: checked when it runs
            return True
        try:
            parse_layout_json(boxes)
        except LayoutError as e:
            return error_text("TroupeLayout", None, str(e))
        return True

    @classmethod
    def execute(cls, width: int, height: int, boxes: str, subjects=None) -> io.NodeOutput:
        try:
            return io.NodeOutput(build_layout(width, height, boxes, subjects))
        except LayoutError as e:
            raise node_error("TroupeLayout", "boxes", str(e)) from None


class TroupeLayoutFromMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeLayoutFromMasks",
            display_name="Troupe Layout from Masks",
            category=CATEGORY,
            description="Turn a MASK batch (one mask per subject, in subject order) into a layout; "
                        "each region keeps its mask and its bounding box.",
            inputs=[
                io.Mask.Input("masks", tooltip="MASK batch [N, H, W]: mask i is the region of subject i."),
                io.Int.Input("width", default=0, min=0, max=8192, step=8,
                             tooltip="Canvas width in pixels; 0 uses the mask width."),
                io.Int.Input("height", default=0, min=0, max=8192, step=8,
                             tooltip="Canvas height in pixels; 0 uses the mask height."),
            ],
            outputs=[types.Layout.Output(display_name="layout",
                                         tooltip="The regions, one per mask (region i = subject i).")],
        )

    @classmethod
    def execute(cls, masks, width: int, height: int) -> io.NodeOutput:
        try:
            return io.NodeOutput(layout_from_masks(masks, width or None, height or None))
        except LayoutError as e:
            raise node_error("TroupeLayoutFromMasks", "masks", str(e)) from None


class TroupeLayoutToMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeLayoutToMasks",
            display_name="Troupe Layout to Masks",
            category=CATEGORY,
            description="Render the layout's regions as a MASK batch (one mask per subject) at any size.",
            inputs=[
                types.Layout.Input("layout", tooltip="The layout to render."),
                io.Int.Input("width", default=0, min=0, max=8192,
                             tooltip="Mask width in pixels; 0 uses the layout's canvas width."),
                io.Int.Input("height", default=0, min=0, max=8192,
                             tooltip="Mask height in pixels; 0 uses the layout's canvas height."),
                io.Combo.Input("edge", options=list(EDGE_MODES), default="coverage",
                               tooltip="coverage: exact fraction of each pixel inside the box; binary: any "
                                       "overlap counts (MS-Diffusion's latent rule); center: pixel centre inside."),
                io.Combo.Input("overlap", options=list(OVERLAP_POLICIES), default="share",
                               tooltip="share: overlaps belong to every region; front: later boxes occlude "
                                       "earlier ones; normalize: masks are scaled to sum to at most 1."),
                io.Float.Input("feather", default=0.0, min=0.0, max=256.0, step=1.0,
                               tooltip="Gaussian blur sigma in canvas pixels (scaled to the mask size)."),
            ],
            outputs=[io.Mask.Output(display_name="masks",
                                    tooltip="One mask per region at the chosen size (a MASK batch).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, layout: Layout, width: int, height: int, edge: str, overlap: str, feather: float) -> io.NodeOutput:
        masks = layout.masks(height or layout.height, width or layout.width, edge=edge, overlap=overlap,
                             feather=feather)
        return io.NodeOutput(masks, ui=ui.PreviewImage(draw_masks(masks), cls=cls))


class TroupeLayoutPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeLayoutPreview",
            display_name="Troupe Layout Preview",
            category=CATEGORY,
            description="Draw the layout's boxes with their subject numbers, colours and labels over an "
                        "image (resized to the canvas) or a blank canvas.",
            inputs=[
                types.Layout.Input("layout", tooltip="The layout to draw."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional background, e.g. the generated image; blank grey when absent."),
                types.Subjects.Input("subjects", optional=True,
                                     tooltip="Optional subject list: its labels name the boxes, and on a blank canvas "
                                             "each box shows its subject's reference photo."),
            ],
            outputs=[io.Image.Output(display_name="image",
                                     tooltip="The boxes, numbers, colours and labels drawn over the image, or each subject's reference in its box.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, layout: Layout, image=None, subjects=None) -> io.NodeOutput:
        thumbnails = None
        if subjects is not None:
            layout = layout.with_labels([s.label for s in subjects])
            if image is None:
                thumbnails = [s.image[:1] for s in subjects]
        picture = draw_layout(layout, image, thumbnails=thumbnails)
        return io.NodeOutput(picture, ui=ui.PreviewImage(picture, cls=cls))
