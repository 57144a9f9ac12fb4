"""Pseudo-correspondences for MOSAIC's correspondence loss: mutual nearest neighbours of DINO patch features.

MOSAIC trains on SemAlign-MS's point annotations, which are not public. ``troupe_train.py correspond`` proposes
pairs instead: each subject's first reference (or its crop of the target) and the target are encoded by a DINO
ViT (``models/encoding/dino.py``; both images stretched to the encoder's square input), and a reference patch and
a target patch inside the subject's box are paired when each is the other's nearest neighbour by cosine similarity
and that similarity reaches ``threshold``. Pairs are written as the manifest's per-subject ``correspondences``
(patch centres, normalised): pseudo-labels, as good as the features.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.5  # our choice: DINOv2 patch pairs of the same part of an object score about 0.5-0.8
DEFAULT_RESOLUTION = 224  # the DINO input side (16 x 16 patches for a ViT-*/14)


def mutual_matches(ref: torch.Tensor, tgt: torch.Tensor, threshold: float,
                   allowed: torch.Tensor | None = None) -> list[tuple[int, int, float]]:
    """(reference index, target index, cosine) of every mutual nearest-neighbour pair with cosine >= threshold.

    ref [Nr, D], tgt [Nt, D]; ``allowed`` [Nt] bool limits the target side (the subject's box) before the search.
    """
    sim = F.normalize(ref.float(), dim=-1) @ F.normalize(tgt.float(), dim=-1).T  # [Nr, Nt]
    if allowed is not None:
        sim = sim.masked_fill(~allowed.bool()[None], float("-inf"))
    if sim.numel() == 0:
        return []
    best_t = sim.argmax(1)  # each reference patch's nearest target patch
    best_r = sim.argmax(0)  # each target patch's nearest reference patch
    out = []
    for i in range(sim.shape[0]):
        j = int(best_t[i])
        s = float(sim[i, j])
        if int(best_r[j]) == i and s >= threshold:
            out.append((i, j, s))
    return out


def patch_centres(grid: tuple[int, int]) -> torch.Tensor:
    """[h*w, 2] normalised (x, y) of each patch centre, row-major."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1).reshape(-1, 2)


def propose(encoder, reference: torch.Tensor, target: torch.Tensor, box, threshold: float = DEFAULT_THRESHOLD,
            resolution: int = DEFAULT_RESOLUTION) -> list[list[float]]:
    """[ref_x, ref_y, target_x, target_y] pairs (normalised, rounded to 1e-6) for one subject: reference and target
    IMAGE [H, W, 3], the subject's normalised box in the target."""
    from ..models.encoding.dino import resize

    side = encoder.square_size(resolution)
    tokens = encoder.tokens(torch.cat([resize(reference[None], (side, side)), resize(target[None], (side, side))]))
    centres = patch_centres(tokens.grid)
    x0, y0, x1, y1 = box
    inside = ((centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1))
    pairs = mutual_matches(tokens.patches[0], tokens.patches[1], threshold, inside)
    return [[round(float(v), 6) for v in (*centres[i].tolist(), *centres[j].tolist())] for i, j, _ in pairs]


@dataclass
class CorrespondReport:
    records: int
    subjects: int
    pairs: int
    empty: int  # subjects left without a pair

    def summary(self, out: Path) -> str:
        return (f"{out}: {self.pairs} pseudo-correspondences for {self.subjects} subjects of {self.records} records "
                f"({self.empty} subjects with none: lower --threshold to get some)")


def correspond_manifest(manifest: str | os.PathLike, encoder, out: str | os.PathLike | None = None,
                        threshold: float = DEFAULT_THRESHOLD, resolution: int = DEFAULT_RESOLUTION,
                        progress=None) -> CorrespondReport:
    """Propose every subject's ``correspondences`` and write the manifest (``out``, default: in place), each line
    as it was but for that field (a subject's earlier correspondences are replaced)."""
    from .data import load_mask, load_rgb
    from .manifest import read_manifest

    manifest = Path(manifest)
    out = Path(out) if out is not None else manifest
    records = {r.line: r for r in read_manifest(manifest)}
    lines = manifest.read_text(encoding="utf-8").splitlines()
    pairs = empty = subjects = 0
    for n, (line, record) in enumerate(sorted(records.items())):
        data = json.loads(lines[line - 1])
        image = load_rgb(record.image)
        h, w = image.shape[:2]
        for s, entry in zip(record.subjects, data["subjects"]):
            if s.crop_from_target:
                from .data import box_pixels

                top, bottom, left, right = box_pixels(s.box, h, w)
                reference = image[top:bottom, left:right]
                if s.mask is not None:  # the subject on white, as the trainer prepares a cropped reference
                    m = load_mask(s.mask)
                    if m.shape == (h, w):
                        m = m[top:bottom, left:right, None]
                        reference = reference * m + (1 - m)
            else:
                reference = load_rgb(s.references[0])
            found = propose(encoder, reference, image, s.box, threshold, resolution)
            entry["correspondences"] = found
            subjects += 1
            pairs += len(found)
            empty += not found
        lines[line - 1] = json.dumps(data, ensure_ascii=False)
        if progress is not None:
            progress(n + 1, len(records))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.resolve() != manifest.resolve():
        rel = os.path.relpath(manifest.parent.resolve(), out.parent.resolve())
        if rel != ".":
            lines = [_rebased(x, rel) if x.strip() else x for x in lines]
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    tmp.replace(out)
    return CorrespondReport(len(records), subjects, pairs, empty)


def _rebased(line: str, rel: str) -> str:
    """A manifest line whose relative paths start at another folder (``rel``: the old folder seen from the new)."""
    data = json.loads(line)

    def fix(p):
        return p if not isinstance(p, str) or os.path.isabs(p) else Path(rel, p).as_posix()

    if "image" in data:
        data["image"] = fix(data["image"])
    for s in data.get("subjects", []):
        if isinstance(s, dict):
            if "mask" in s:
                s["mask"] = fix(s["mask"])
            if isinstance(s.get("references"), list):
                s["references"] = [fix(r) for r in s["references"]]
    return json.dumps(data, ensure_ascii=False)
