"""Sample grids during training: the config's fixed prompts, subjects and layouts, generated through the same patch a
user's graph installs (SDXL: ``TroupeApplySDXL``, ``nodes.sdxl.apply_sdxl``; FLUX adapters: ``TroupeEncodeSubjects``
with the HMoE fusion and ``TroupeApplyFLUX``, ``nodes.flux.apply_flux``), on the trainer's own copy of the base.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..models.adapter_file import Adapter
from ..models.layout.layout import Layout, Region
from ..models.layout.subject import Subject
from ..models.sdxl.formats import describe
from ..models.sdxl.patch import RegionalParams
from .config import SampleCase
from .data import load_rgb

if TYPE_CHECKING:
    from .trainer import Trainer


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def sdxl_model(trainer: Trainer, module, patcher, subjects, layout):
    """``TroupeApplySDXL`` with the adapter as it is at this step."""
    from ..nodes.encoding import encode_subjects
    from ..nodes.sdxl import apply_sdxl

    features = encode_subjects(trainer.encoders.clip_vision, subjects)
    adapter = Adapter(family="sdxl", format=module.adapter.format, module=module.adapter,
                      info=describe(module.adapter))
    return apply_sdxl(patcher, adapter, features, layout, RegionalParams(), clip=trainer.encoders.clip)


def flux_model(trainer: Trainer, module, patcher, subjects, layout):
    """``TroupeEncodeSubjects`` (CLIP layers 10/17/24 fused by the HMoE) and ``TroupeApplyFLUX`` with the adapter and
    fusion as they are at this step, copied to the CPU in fp32 as the loader nodes give the saved files."""
    import copy

    from ..models.flux.adapter import TROUPE
    from ..nodes.encoding import encode_subjects
    from ..nodes.flux import ApplySettings, apply_flux
    from .flux import CLIP_LAYERS

    adapter_module = copy.deepcopy(module.adapter).float().cpu().eval()
    fusion = copy.deepcopy(module.fusion).float().cpu().eval()
    features = encode_subjects(trainer.encoders.clip_vision, subjects, layers=CLIP_LAYERS, fusion=fusion)
    adapter = Adapter(family="flux", format=TROUPE, module=adapter_module)
    return apply_flux(patcher, adapter, features, ApplySettings(), layout=layout)


def conditioning(trainer: Trainer, case: SampleCase, text: str) -> list:
    """CONDITIONING of ``text`` as CLIPTextEncode gives it, with SDXL's size conditions or FLUX's guidance
    (FluxGuidance at the trainer's ``GUIDANCE``)."""
    clip = trainer.encoders.clip
    c, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    if trainer.config.method.flux:
        from .flux import GUIDANCE

        return [[c, {"pooled_output": pooled, "guidance": GUIDANCE}]]
    return [[c, {"pooled_output": pooled, "width": case.width, "height": case.height, "crop_w": 0, "crop_h": 0,
                 "target_width": case.width, "target_height": case.height}]]


def generate(trainer: Trainer, case: SampleCase) -> torch.Tensor:
    """One sample case as IMAGE [H, W, 3], seeded, with what trains as it is at this step (euler; SDXL's "normal"
    schedule, FLUX's "simple")."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample

    module = trainer.unwrapped()
    was_training = module.training
    module.eval()
    flux = trainer.config.method.flux
    try:
        subjects = [Subject(image=load_rgb(s.image)[None], label=s.label) for s in case.subjects]
        layout = Layout(case.width, case.height, tuple(Region(box=s.box, label=s.label) for s in case.subjects))
        patcher = comfy.model_patcher.ModelPatcher(trainer.base_model, load_device=trainer.frozen.device,
                                                   offload_device=comfy.model_management.unet_offload_device())
        with torch.inference_mode():
            model = patcher
            if subjects:
                model = (flux_model if flux else sdxl_model)(trainer, module, patcher, subjects, layout)
            channels = trainer.base_model.latent_format.latent_channels
            latent = torch.zeros(1, channels, case.height // 8, case.width // 8)
            noise = comfy.sample.prepare_noise(latent, case.seed)
            out = comfy.sample.sample(model, noise, case.steps, case.cfg, "euler", "simple" if flux else "normal",
                                      conditioning(trainer, case, case.prompt), conditioning(trainer, case, ""),
                                      latent, seed=case.seed, disable_pbar=True)
            return trainer.encoders.vae.decode(out)[0].float().clamp(0, 1).cpu().clone()
    finally:
        module.train(was_training)


def sample_grid(trainer: Trainer, path: Path) -> Path:
    """Every sample case side by side, captioned with its prompt, and the step number on top."""
    images = [generate(trainer, case) for case in trainer.config.samples]
    h = max(int(i.shape[0]) for i in images)
    w = sum(int(i.shape[1]) for i in images)
    head = 28
    canvas = Image.new("RGB", (w, h + 2 * head), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), f"step {trainer.step}  ({trainer.config.method.name})", fill="#111111", font=_font(16))
    x = 0
    for img, case in zip(images, trainer.config.samples):
        canvas.paste(Image.fromarray((img.numpy() * 255).round().astype(np.uint8)), (x, head))
        draw.text((x + 4, h + head + 6), case.prompt[:80], fill="#333333", font=_font(12))
        x += int(img.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
