"""TROUPE_SUBJECT: one subject's reference image(s), optional mask, label and weight."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

MAX_SUBJECTS = 8
MAX_LABEL_CHARS = 200  # a concept word or short phrase; the labels are tokenised and searched in the prompt


class SubjectError(ValueError):
    """A subject value that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Subject:
    """Reference images [B, H, W, 3] in [0, 1] (ComfyUI IMAGE), optional mask [B or 1, H, W], label, weight.

    ``label`` is the concept word that names the subject in the prompt (e.g. "corgi");
    ``weight`` scales how strongly later adapters inject this subject (1.0 = as trained).
    """

    image: torch.Tensor
    label: str
    mask: torch.Tensor | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, torch.Tensor) or img.ndim != 4 or img.shape[-1] not in (3, 4):
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise SubjectError(f"image: expected an IMAGE batch [B, H, W, 3] (RGB; RGBA is read as RGB), got {shape}; "
                               "convert a grayscale or multi-channel image to RGB first")
        if img.numel() == 0 or not bool(torch.isfinite(img).all()):
            raise SubjectError("image: the reference holds NaN or infinite values (or no pixels); connect a decoded "
                               "image with finite values in [0, 1]")
        if img.shape[-1] == 4:
            object.__setattr__(self, "image", img[..., :3])
        label = (self.label or "").strip()
        if not label:
            raise SubjectError('label: give the word that names this subject in the prompt, e.g. "corgi"')
        if len(label) > MAX_LABEL_CHARS:
            raise SubjectError(f"label: {len(label)} characters; a label is the word or short phrase that names the "
                               f"subject in the prompt (at most {MAX_LABEL_CHARS}), e.g. \"corgi\"")
        object.__setattr__(self, "label", label)
        if not isinstance(self.weight, (int, float)) or not 0.0 <= float(self.weight) <= 10.0:
            raise SubjectError(f"weight: expected a number in [0, 10], got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if self.mask is not None:
            m = self.mask
            if m.ndim == 2:
                m = m[None]
            b, h, w = self.image.shape[:3]
            if m.ndim != 3 or tuple(m.shape[1:]) != (h, w) or m.shape[0] not in (1, b):
                raise SubjectError(
                    f"mask: expected a MASK of the image's size [1 or {b}, {h}, {w}], got {tuple(self.mask.shape)}; "
                    "resize the mask to the reference image"
                )
            if not bool(torch.isfinite(m).all()):
                raise SubjectError("mask: the mask holds NaN or infinite values; connect a mask with values in [0, 1]")
            object.__setattr__(self, "mask", m.float().clamp(0.0, 1.0))

    @property
    def num_images(self) -> int:
        return int(self.image.shape[0])

    def masks(self) -> torch.Tensor:
        """The subject mask per reference image [B, H, W] (all ones when no mask was given)."""
        b, h, w = self.image.shape[:3]
        if self.mask is None:
            return torch.ones(b, h, w, dtype=self.image.dtype, device=self.image.device)
        return self.mask.expand(b, h, w)

    def with_weight(self, weight: float) -> Subject:
        return replace(self, weight=weight)


def subject_list(items: Sequence[Subject | None]) -> tuple[Subject, ...]:
    """Collect the connected subjects in order (order = layout region order)."""
    subjects = tuple(s for s in items if s is not None)
    if not subjects:
        raise SubjectError("connect at least one subject")
    if len(subjects) > MAX_SUBJECTS:
        raise SubjectError(f"at most {MAX_SUBJECTS} subjects, got {len(subjects)}")
    for s in subjects:
        if not isinstance(s, Subject):
            raise SubjectError(f"expected TROUPE_SUBJECT values, got {type(s).__name__}")
    return subjects
