"""Sample grids during training: the config's fixed prompts, subjects and layouts, generated through the same
``TroupeApplySDXL`` patch a user's graph installs (``nodes.sdxl.apply_sdxl``), on the trainer's own copy of the base.
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


def generate(trainer: Trainer, case: SampleCase) -> torch.Tensor:
    """One sample case as IMAGE [H, W, 3], seeded, with the adapter as it is at this step."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample

    from ..nodes.encoding import encode_subjects
    from ..nodes.sdxl import apply_sdxl

    module = trainer.unwrapped().adapter
    was_training = module.training
    module.eval()
    try:
        clip, vae = trainer.encoders.clip, trainer.encoders.vae
        subjects = [Subject(image=load_rgb(s.image)[None], label=s.label) for s in case.subjects]
        layout = Layout(case.width, case.height, tuple(Region(box=s.box, label=s.label) for s in case.subjects))
        patcher = comfy.model_patcher.ModelPatcher(trainer.base_model, load_device=trainer.frozen.device,
                                                   offload_device=comfy.model_management.unet_offload_device())
        with torch.inference_mode():
            model = patcher
            if subjects:
                features = encode_subjects(trainer.encoders.clip_vision, subjects)
                adapter = Adapter(family="sdxl", format=module.format, module=module, info=describe(module))
                model = apply_sdxl(patcher, adapter, features, layout, RegionalParams(), clip=clip)

            def cond(text: str) -> list:
                c, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
                return [[c, {"pooled_output": pooled, "width": case.width, "height": case.height, "crop_w": 0,
                             "crop_h": 0, "target_width": case.width, "target_height": case.height}]]

            latent = torch.zeros(1, 4, case.height // 8, case.width // 8)
            noise = comfy.sample.prepare_noise(latent, case.seed)
            out = comfy.sample.sample(model, noise, case.steps, case.cfg, "euler", "normal", cond(case.prompt),
                                      cond(""), latent, seed=case.seed, disable_pbar=True)
            return vae.decode(out)[0].float().clamp(0, 1).cpu().clone()
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
