"""TroupeTrainAdapter: a small SDXL adapter training run (R^3-Adapter, MS-Diffusion, MultiPersona-Align) in ComfyUI.

A thin node over the training toolkit (``training/``): the graph supplies the frozen models, the node's inputs and an
optional TOML snippet make the config, and the trainer writes its run folder under ComfyUI's output folder. The new
adapter is copied into ``models/troupe`` so that TroupeLoadAdapter lists it. Big runs belong to the command line
(``python troupe_train.py train config.toml``): same trainer, several GPUs, no browser tab to keep open.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..training.config import PREFERENCE_METHODS, SDXL_METHODS
from ..training.in_comfyui import (
    CATEGORY,
    NODE,
    NONE,
    TrainSettings,
    dataset_problem,
    dino_problem,
    output_name_problem,
    train_adapter,
)
from . import paths


class TroupeTrainAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Troupe Train Adapter (SDXL)",
            category=CATEGORY,
            description="Train a multi-subject SDXL adapter on your own dataset, for small runs inside ComfyUI: "
                        "R^3-Adapter, MS-Diffusion or MultiPersona-Align, on a copy of the connected model (never "
                        "changed). Writes the run folder to output/troupe_training/<output_name>/ and the adapter "
                        "to models/troupe/<output_name>.safetensors; shows the loss curves, the last sample grid and "
                        "the final losses. Big runs: python troupe_train.py train config.toml.",
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model to train against (frozen; the node trains on a copy)."),
                io.Clip.Input("clip", tooltip="The SDXL checkpoint's CLIP: encodes the captions and the subject words "
                                              "(CLIP-L's width sizes a new adapter's phrase embeddings)."),
                io.Vae.Input("vae", tooltip="The SDXL VAE: encodes the training images to latents (cached once)."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="The CLIP vision model that encodes the references (ViT-bigG/14 for "
                                            "MS-Diffusion-sized adapters); its width sizes a new adapter. Use the same "
                                            "one when you generate."),
                io.String.Input("dataset", default="",
                                tooltip="A folder holding manifest.jsonl, or the path of a .jsonl manifest: one line "
                                        "per image with its caption, subjects, boxes and references "
                                        "(docs/training-data.md)."),
                io.Combo.Input("method", options=[m for m in SDXL_METHODS if m not in PREFERENCE_METHODS], default="r3",
                               tooltip="r3: R^3-Adapter (refiner, router, DINO alignment); ms-diffusion: the adapter "
                                       "alone, diffusion loss only; multipersona: MultiPersona-Align's dual DINO "
                                       "alignment."),
                io.Combo.Input("dino_model", options=[NONE, *paths.list_hf_folders("dino")], default=NONE,
                               tooltip="A HF DINOv2/DINOv3 folder in ComfyUI/models/dino for the alignment loss (r3, "
                                       "multipersona); 'none' only with ms-diffusion."),
                io.Combo.Input("init_adapter", options=[NONE, *paths.choices(paths.ADAPTER_FOLDERS)], default=NONE,
                               tooltip="Start from an MS-Diffusion or R^3 SDXL file (R^3 from an MS-Diffusion file "
                                       "adds a fresh refiner and router); 'none' = a new adapter."),
                io.String.Input("output_name", default="troupe_trained",
                                tooltip="Name of the run: the adapter is models/troupe/<output_name>.safetensors and "
                                        "the run folder output/troupe_training/<output_name>/."),
                io.Int.Input("steps", default=200, min=1, max=1_000_000,
                             tooltip="Optimiser steps (the samples grid is rendered at the last one)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Training images per step."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-8,
                               tooltip="AdamW learning rate (IP-Adapter's 1e-4)."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=64,
                             tooltip="Training resolution in pixels, a multiple of 64 (images are centre-cropped "
                                     "square); SDXL's native 1024."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed of the data order, noise and dropout draws, and of the sample grid."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from the latest checkpoint in the run folder of output_name (a "
                                         "cancelled run saves one); off = a fresh run, refused when that folder "
                                         "already holds one."),
                io.String.Input("extra_config", default="", multiline=True, optional=True,
                                tooltip="Optional TOML merged over the node's values: [adapter] sizes, [method] "
                                        "phase1_steps / ramp_steps / align_weight, [train] precision / "
                                        "checkpoint_every / sample_every, [dropout], [[sample]] cases "
                                        "(docs/training.md). Relative paths start at the dataset's folder."),
            ],
            outputs=[
                io.Image.Output(display_name="loss_plot", tooltip="The loss curves of the run (curves.png)."),
                io.Image.Output(display_name="samples",
                                tooltip="The last sample grid: the dataset's first record (or your [[sample]] cases) "
                                        "generated with the adapter as trained."),
                io.String.Output(display_name="adapter_name",
                                 tooltip="The new file's name in models/troupe: pick it in TroupeLoadAdapter "
                                         "(press R to refresh the list)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dataset: str | None = None, output_name: str | None = None, method: str | None = None,
                        dino_model: str | None = None) -> bool | str:
        """At queue time, what the values alone decide (a linked value is None here and is checked when it runs)."""
        checks = (dataset_problem(dataset) if dataset is not None else None,
                  output_name_problem(output_name) if output_name is not None else None,
                  dino_problem(method, dino_model) if method is not None else None)
        return next((c for c in checks if c is not None), True)

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, dataset: str, method: str, dino_model: str, init_adapter: str,
                output_name: str, steps: int, batch_size: int, learning_rate: float, resolution: int, seed: int,
                resume: bool, extra_config: str = "") -> io.NodeOutput:
        settings = TrainSettings(dataset=dataset, method=method, dino_model=dino_model, init_adapter=init_adapter,
                                 output_name=output_name, steps=steps, batch_size=batch_size,
                                 learning_rate=learning_rate, resolution=resolution, seed=seed, resume=resume,
                                 extra_config=extra_config or "")
        out = train_adapter(model, clip, vae, clip_vision, settings)
        preview = ui.PreviewImage(out.loss_plot, cls=cls).as_dict()
        return io.NodeOutput(out.loss_plot, out.samples, out.adapter_name,
                             ui={"images": preview["images"], "text": (out.text,)})
