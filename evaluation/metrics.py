"""Per-subject fidelity and leakage: CLIP-I, DINO and CLIP-T as 000 (Sec. 4), 001 (Sec. 4) and MS-Diffusion report them.

The subject x region matrix (rows: the generated image's region crops, columns: the subjects' references):

    S[r, s] = mean_v cos(E(crop_r), E(ref_{s, v}))            (v: the subject's reference views)

- CLIP-I / DINO of subject i: the diagonal S[i, i] (CLIP image tower / DINO CLS token);
- leakage of subject i: the off-diagonal row S[i, j != i], how much region i looks like another subject;
- identity margin of subject i: S[i, i] - max_{j != i} S[i, j] (> 0: region i looks most like its own subject);
- CLIP-T: cos(E_image(whole image), E_text(prompt)), raw cosine (not CLIPScore's 2.5 x max(cos, 0)).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbones import ImageTextModel, ImageTower
from .crops import check_crop_mode, prepare_batch, reference_crops, region_crops

JSON_VERSION = 1


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_r, b_s) for every pair: [R, D] x [S, D] -> [R, S] (float64)."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def subject_matrix(regions: torch.Tensor, references: torch.Tensor, views: Sequence[int]) -> torch.Tensor:
    """S[r, s]: region embeddings [R, D] against reference embeddings [sum(views), D], averaged over each subject's views."""
    sims = cosine_matrix(regions, references)
    return torch.stack([chunk.mean(1) for chunk in sims.split(list(views), dim=1)], dim=1)


@dataclass(frozen=True)
class SubjectMatrix:
    """One metric's subject x region matrix [N, N] (row r = region r, column s = subject s) and its summaries."""

    matrix: torch.Tensor

    @property
    def own(self) -> torch.Tensor:
        """Fidelity per subject: the diagonal."""
        return self.matrix.diagonal()

    def leakage(self) -> torch.Tensor:
        """The off-diagonal: S[i, j] for j != i, NaN on the diagonal."""
        out = self.matrix.clone()
        out.fill_diagonal_(float("nan"))
        return out

    def best_other(self) -> torch.Tensor:
        """max_{j != i} S[i, j] per region (NaN with one subject)."""
        n = self.matrix.shape[0]
        if n < 2:
            return torch.full((n,), float("nan"), dtype=self.matrix.dtype)
        return self.leakage().nan_to_num(float("-inf")).amax(1)

    def margin(self) -> torch.Tensor:
        """Identity margin per subject: own minus best other."""
        return self.own - self.best_other()

    def as_dict(self, labels: Sequence[str]) -> dict:
        n = len(labels)
        return {
            "matrix": rounded(self.matrix.tolist()),
            "rows": "regions", "columns": "subjects",
            "own": rounded(self.own.tolist()),
            "best_other": rounded(self.best_other().tolist()),
            "margin": rounded(self.margin().tolist()),
            "leakage": [{labels[j]: rounded(float(self.matrix[i, j])) for j in range(n) if j != i} for i in range(n)],
            "mean": rounded(float(self.own.mean())),
            "mean_margin": rounded(float(self.margin().mean())) if n > 1 else None,
        }


def rounded(value, digits: int = 6):
    """Floats rounded for the JSON (NaN -> None), lists recursively."""
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class SubjectRefs:
    """What the metrics need of a subject: its label, reference views [B, H, W, 3] and optional masks [B, H, W]."""

    label: str
    images: torch.Tensor
    masks: torch.Tensor | None = None


@dataclass(frozen=True)
class Fidelity:
    """The scores of one generated image: the matrices (CLIP-I, DINO), CLIP-T, and the crops they compared."""

    labels: tuple[str, ...]
    views: tuple[int, ...]
    clip_i: SubjectMatrix | None
    dino: SubjectMatrix | None
    clip_t: float | None
    regions: tuple[torch.Tensor, ...]
    references: tuple[torch.Tensor, ...]
    backbones: dict
    crop: str
    prompt: str
    image_size: tuple[int, int]
    region_boxes: tuple[tuple[float, float, float, float], ...] = ()
    region_kinds: tuple[str, ...] = ()

    def matrices(self) -> dict[str, SubjectMatrix]:
        return {k: m for k, m in (("clip_i", self.clip_i), ("dino", self.dino)) if m is not None}

    def as_dict(self) -> dict:
        """Every number and the backbones' names (the node's JSON output)."""
        n = len(self.labels)
        subjects = []
        for i, label in enumerate(self.labels):
            row = {"label": label, "references": self.views[i]}
            if self.region_boxes:
                row["region"] = rounded(list(self.region_boxes[i]))
                row["region_kind"] = self.region_kinds[i]
            for name, m in self.matrices().items():
                row[name] = rounded(float(m.own[i]))
                row[f"{name}_margin"] = rounded(float(m.margin()[i]))
                row[f"{name}_leakage"] = {self.labels[j]: rounded(float(m.matrix[i, j])) for j in range(n) if j != i}
            subjects.append(row)
        return {
            "version": JSON_VERSION,
            "backbones": dict(self.backbones),
            "crop": self.crop,
            "prompt": self.prompt,
            "image_size": list(self.image_size),
            "clip_t": rounded(self.clip_t) if self.clip_t is not None else None,
            "subjects": subjects,
            "matrices": {name: m.as_dict(self.labels) for name, m in self.matrices().items()},
        }


def embed_crops(tower: ImageTower, crops: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """Every crop prepared for the tower and embedded in one batched forward -> [N, D]."""
    return tower.encode(prepare_batch(crops, tower.size, mode)).float().cpu()


def tower_matrix(tower: ImageTower, regions: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
                 views: Sequence[int], mode: str) -> SubjectMatrix:
    """One backbone's subject x region matrix: regions and all reference views in one forward."""
    emb = embed_crops(tower, [*regions, *references], mode)
    return SubjectMatrix(subject_matrix(emb[:len(regions)], emb[len(regions):], views))


def score_image(image: torch.Tensor, layout, subjects: Sequence[SubjectRefs], prompt: str = "",
                image_text: ImageTextModel | None = None, dino: ImageTower | None = None,
                crop: str = "pad") -> Fidelity:
    """All metrics of one generated image [H, W, 3]: CLIP-I and DINO matrices per region, CLIP-T of the whole image."""
    check_crop_mode(crop)
    if len(subjects) != len(layout.regions):
        raise ValueError(f"{len(subjects)} subjects but {len(layout.regions)} layout regions; give one region per "
                         "subject, in subject order")
    if image_text is None and dino is None:
        raise ValueError("no backbone: give an image-text model (CLIP-I, CLIP-T) and/or a DINO model")
    regions = region_crops(image, layout)
    references = [c for s in subjects for c in reference_crops(s.images, s.masks)]
    views = tuple(int(s.images.shape[0]) for s in subjects)
    clip_i = dino_m = clip_t = None
    backbones = {}
    if image_text is not None:
        backbones["clip_image"] = image_text.image.name
        clip_i = tower_matrix(image_text.image, regions, references, views, crop)
        if image_text.text is not None and prompt.strip():
            backbones["clip_text"] = image_text.text.name
            whole = embed_crops(image_text.image, [image[..., :3].float()], crop)
            text = image_text.text.encode([prompt]).float().cpu()
            clip_t = float(cosine_matrix(whole, text)[0, 0])
    if dino is not None:
        backbones["dino"] = dino.name
        dino_m = tower_matrix(dino, regions, references, views, crop)
    kinds = tuple("mask" if r.mask is not None else "box" for r in layout.regions)
    return Fidelity(labels=tuple(s.label for s in subjects), views=views, clip_i=clip_i, dino=dino_m, clip_t=clip_t,
                    regions=tuple(regions), references=tuple(references), backbones=backbones, crop=crop,
                    prompt=prompt, image_size=(int(image.shape[0]), int(image.shape[1])),
                    region_boxes=tuple(tuple(b) for b in layout.boxes), region_kinds=kinds)
