"""TroupeFidelity: per-subject CLIP-I, DINO, leakage and CLIP-T of a generated image (000 and 001, Sec. 4)."""
from __future__ import annotations

import json

import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..evaluation.backbones import ImageTower
from ..evaluation.crops import CROP_MODES
from ..evaluation.heatmap import draw_fidelity
from ..evaluation.metrics import JSON_VERSION, Fidelity, SubjectRefs, score_image
from . import paths, types
from .dino import comfy_dino_encoder, hf_dino_encoder
from .errors import node_error

CATEGORY = "Troupe/evaluation"
NODE = "TroupeFidelity"
NONE = "none"


def dino_tower(dino_vision=None, dino_model: str = NONE, resolution: int = 224) -> ImageTower | None:
    """The DINO CLS token as an image tower: ComfyUI's DINOv2 (dino_vision) or a models/dino folder; None for neither."""
    folder = dino_model not in (None, "", NONE)
    if dino_vision is not None and folder:
        raise node_error(NODE, None, f"both 'dino_vision' and 'dino_model' ({dino_model}) are given; keep one: "
                         "disconnect dino_vision or set dino_model to 'none'")
    if dino_vision is None and not folder:
        return None
    if dino_vision is not None:
        encoder = comfy_dino_encoder(dino_vision, node=NODE, input_name="dino_vision")
    else:
        encoder = hf_dino_encoder(dino_model, node=NODE)
    size = encoder.square_size(resolution)
    name = encoder.name if encoder.fixed_size else f"{encoder.name}, {size} px"
    return ImageTower(name=f"{name}, CLS token", size=size, encode=lambda batch: encoder.tokens(batch).cls)


def check_inputs(image: torch.Tensor, subjects, layout) -> None:
    """Refuse mismatches before any model runs."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise node_error(NODE, "image", f"expected an IMAGE batch [B, H, W, 3], got {tuple(image.shape)}")
    if len(subjects) != len(layout):
        raise node_error(NODE, "layout", f"{len(layout)} regions but {len(subjects)} subjects; the layout needs one "
                         "region per subject, in subject order (use the layout you generated with)")
    h, w = int(image.shape[1]), int(image.shape[2])
    if abs(w / h - layout.width / layout.height) > 0.02:
        raise node_error(NODE, "image", f"the image is {w}x{h} but the layout canvas is {layout.width}x"
                         f"{layout.height} (another aspect ratio), so its regions would land elsewhere; give the "
                         "image generated with this layout, or a layout of the image's size")


def fidelity_json(results: list[Fidelity]) -> str:
    """One image: its result; a batch: ``{"version", "images": [...]}``."""
    if len(results) == 1:
        return json.dumps(results[0].as_dict(), indent=1)
    return json.dumps({"version": JSON_VERSION, "images": [r.as_dict() for r in results]}, indent=1)


def measure(image: torch.Tensor, subjects, layout, image_text, prompt: str = "", crop: str = "pad",
            dino_vision=None, dino_model: str = NONE, dino_resolution: int = 224) -> tuple[list[Fidelity], torch.Tensor]:
    """Every image of the batch scored; the heat-maps as one IMAGE batch (padded to the largest)."""
    check_inputs(image, subjects, layout)
    if crop not in CROP_MODES:
        raise node_error(NODE, "crop", f"expected one of {', '.join(CROP_MODES)}, got {crop!r}")
    dino = dino_tower(dino_vision, dino_model, dino_resolution)
    refs = [SubjectRefs(label=s.label, images=s.image, masks=None if s.mask is None else s.masks()) for s in subjects]
    pbar = comfy.utils.ProgressBar(int(image.shape[0]))
    results = []
    for b in range(image.shape[0]):
        try:
            results.append(score_image(image[b].cpu(), layout, refs, prompt, image_text, dino, crop))
        except ValueError as e:
            raise node_error(NODE, None, str(e)) from None
        pbar.update(1)
    maps = [draw_fidelity(r) for r in results]
    h, w = max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)
    batch = torch.ones(len(maps), h, w, 3)
    for i, m in enumerate(maps):
        batch[i, :m.shape[1], :m.shape[2]] = m[0]
    return results, batch


class TroupeFidelity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Troupe Fidelity (CLIP-I, DINO, leakage, CLIP-T)",
            category=CATEGORY,
            description="How well each subject kept its likeness, and where it leaked: each layout region of the "
                        "output against every subject's reference (CLIP-I, DINO; the diagonal is fidelity, the rest "
                        "is leakage, the identity margin is own minus best other), and the whole image against the "
                        "prompt (CLIP-T). Shows the matrices as heat-maps; the JSON has every number and the "
                        "backbones' names.",
            inputs=[
                io.Image.Input("image", tooltip="The generated image(s); each batch item is scored."),
                types.Subjects.Input("subjects", tooltip="The subjects you generated with (their reference images "
                                                         "and masks, in layout order)."),
                types.Layout.Input("layout", tooltip="The layout you generated with: region i is where subject i "
                                                     "should be; its box (or its mask) is cut from the image."),
                types.ImageText.Input("image_text",
                                      tooltip="From TroupeLoadOpenCLIP (CLIP-I + CLIP-T) or TroupeImageTextCLIP "
                                              "(ComfyUI CLIP vision: CLIP-I; with its CLIP text: CLIP-T)."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The prompt the image was generated from, for CLIP-T; empty skips CLIP-T."),
                io.Combo.Input("crop", options=list(CROP_MODES), default="pad",
                               tooltip="pad: each crop padded to a square with white, never cut (what the encoders "
                                       "see); center: short side resized and the centre square cut (CLIP's and "
                                       "DINO's usual evaluation transform)."),
                io.ClipVision.Input("dino_vision", optional=True,
                                    tooltip="Optional DINO: a DINOv2 from Load CLIP Vision (518 px). Leave empty when "
                                            "you pick a folder in dino_model, or for no DINO score."),
                io.Combo.Input("dino_model", options=[NONE, *paths.list_hf_folders("dino")], default=NONE,
                               tooltip="Optional DINO: a HF DINOv2 / DINOv3 ViT folder in ComfyUI/models/dino (as "
                                       "TroupeEncodeDINO loads it); 'none' for dino_vision or no DINO score."),
                io.Int.Input("dino_resolution", default=224, min=14, max=2048,
                             tooltip="Input size for dino_model folders (snapped to the patch size); ignored for "
                                     "dino_vision (518 px)."),
            ],
            outputs=[io.Image.Output(display_name="heatmap",
                                     tooltip="Per-subject similarity and leakage heat-maps."), io.String.Output(display_name="json",
                                                                                                                tooltip="All scores as JSON (per subject, per backbone).")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dino_model: str) -> bool | str:
        return paths.check_dino_folder(NODE, dino_model, NONE)

    @classmethod
    def execute(cls, image, subjects, layout, image_text, prompt: str, crop: str, dino_model: str,
                dino_resolution: int, dino_vision=None) -> io.NodeOutput:
        results, heatmap = measure(image, subjects, layout, image_text, prompt, crop, dino_vision, dino_model,
                                   dino_resolution)
        text = fidelity_json(results)
        preview = ui.PreviewImage(heatmap, cls=cls).as_dict()
        return io.NodeOutput(heatmap, text, ui={"images": preview["images"], "text": (text,)})
