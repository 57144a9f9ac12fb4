"""The backbones the fidelity metrics run: an image tower, an optional text tower, and a DINO tower.

Each tower is a name (written into every result, so numbers stay comparable) and a function: images
[N, S, S, 3] in [0, 1] (prepared by ``evaluation.crops``) -> embeddings [N, D], or prompts -> [N, D].
The sources (OpenCLIP folders, ComfyUI's CLIP vision and CLIP text, DINO) build these; the metrics never
see a model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

METRIC_NAMES = ("clip_i", "clip_t", "dino")


@dataclass(frozen=True)
class ImageTower:
    """``encode``: prepared squares [N, size, size, 3] in [0, 1] -> one embedding per image [N, D]."""

    name: str
    size: int
    encode: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TextTower:
    """``encode``: prompts -> one embedding per prompt [N, D], in the image tower's joint space."""

    name: str
    encode: Callable[[Sequence[str]], torch.Tensor]


@dataclass(frozen=True)
class ImageTextModel:
    """TROUPE_IMAGE_TEXT: an image tower (CLIP-I) and, when it has one, the text tower of the same model (CLIP-T)."""

    image: ImageTower
    text: TextTower | None = None
    source: str = ""

    def metrics(self) -> tuple[str, ...]:
        """The metrics this model supports: CLIP-I always, CLIP-T with a text tower."""
        return ("clip_i", "clip_t") if self.text is not None else ("clip_i",)

    def summary(self) -> str:
        text = self.text.name if self.text is not None else "none (CLIP-T off)"
        return f"source: {self.source}\nimage: {self.image.name}\ntext: {text}\nmetrics: {', '.join(self.metrics())}"
