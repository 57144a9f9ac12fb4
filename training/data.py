"""Training records as tensors, and the feature caches that make a step cost only the UNet.

Each manifest record (``manifest.Record``) becomes a square target at the training resolution (centre crop, as
SDXL's micro-conditioning describes it: original size and crop offset), its boxes in the crop's coordinates, and per
subject its reference images (files, or the target cropped at the box: "crop from target").

Everything an encoder computes is cached on disk once per dataset: the VAE latent of the target, the text encoder's
output for the caption (and the label phrases), CLIP vision features of every reference, and DINO features (CLS of
the target cropped at each box, mean of the target's patch tokens). One safetensors file per record and encoder,
``<cache>/<kind>-<encoder fingerprint>/<hash[:2]>/<hash>.safetensors``, where the hash covers the record and the
bytes of every file it reads plus the resolution: changing the encoder, the resolution or an image makes a new
entry, never a stale one.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.layout.layout import Layout, Region
from .manifest import Record

CACHE_VERSION = "1"


# --------------------------------------------------------------------------- images


def load_rgb(path: Path) -> torch.Tensor:
    """IMAGE [H, W, 3] in [0, 1] (EXIF rotation applied)."""
    from PIL import ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)


def load_mask(path: Path) -> torch.Tensor:
    """MASK [H, W] in [0, 1] from a greyscale (or the alpha of an RGBA) image."""
    with Image.open(path) as im:
        im = im.getchannel("A") if im.mode == "RGBA" else im.convert("L")
        return torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)


def resize(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x = F.interpolate(image.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).clamp(0, 1)


def box_pixels(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a normalised box, at least one pixel each way."""
    x0, y0, x1, y1 = box
    left, top = min(int(x0 * w), w - 1), min(int(y0 * h), h - 1)
    right, bottom = max(int(np.ceil(x1 * w)), left + 1), max(int(np.ceil(y1 * h)), top + 1)
    return top, bottom, left, right


@dataclass(frozen=True)
class SquareCrop:
    """The centre square of an H x W image, resized to ``resolution``: SDXL's original size and crop offset."""

    height: int
    width: int
    resolution: int

    @property
    def side(self) -> int:
        return min(self.height, self.width)

    @property
    def offset(self) -> tuple[int, int]:
        """(top, left) of the square in the original image."""
        return (self.height - self.side) // 2, (self.width - self.side) // 2

    def crop_coords(self) -> tuple[int, int]:
        """(top, left) of the crop at the training resolution, SDXL's ``crop_coords_top_left``."""
        s = self.resolution / self.side
        return round(self.offset[0] * s), round(self.offset[1] * s)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        top, left = self.offset
        return resize(image[top:top + self.side, left:left + self.side], self.resolution, self.resolution)

    def box(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A normalised box of the original image in the square's coordinates, clipped to it."""
        top, left = self.offset
        x0, y0, x1, y1 = box
        def f(v: float, off: int, size: int) -> float:
            return min(max((v * size - off) / self.side, 0.0), 1.0)

        return f(x0, left, self.width), f(y0, top, self.height), f(x1, left, self.width), f(y1, top, self.height)


@dataclass
class Prepared:
    """A record's pixels: the square target, its layout, each subject's references and target crop."""

    record: Record
    target: torch.Tensor  # [R, R, 3]
    crop: SquareCrop
    layout: Layout
    references: list[list[torch.Tensor]]  # per subject, its reference images [h, w, 3]
    masks: list[torch.Tensor | None]  # per subject, the mask of the original image (or None)
    target_crops: list[torch.Tensor]  # per subject, the original image cropped at its box


def prepare(record: Record, resolution: int) -> Prepared:
    image = load_rgb(record.image)
    h, w = image.shape[:2]
    crop = SquareCrop(h, w, resolution)
    regions, refs, masks, crops = [], [], [], []
    for s in record.subjects:
        top, bottom, left, right = box_pixels(s.box, h, w)
        mask = load_mask(s.mask) if s.mask is not None else None
        if mask is not None and mask.shape != (h, w):
            mask = F.interpolate(mask[None, None], size=(h, w), mode="bilinear")[0, 0]
        crops.append(image[top:bottom, left:right])
        if s.crop_from_target:
            ref = image[top:bottom, left:right]
            if mask is not None:  # the subject on white, as TroupeSubject's masked crops are encoded
                m = mask[top:bottom, left:right, None]
                ref = ref * m + (1 - m)
            refs.append([ref])
        else:
            refs.append([load_rgb(p) for p in s.references])
        masks.append(mask)
        regions.append(Region(box=crop.box(s.box), label=s.label))
    layout = Layout(resolution, resolution, tuple(regions))
    return Prepared(record, crop.apply(image), crop, layout, refs, masks, crops)


# --------------------------------------------------------------------------- hashing


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_digest(record: Record, *extra) -> str:
    """A hash of the record's content (caption, labels, boxes and the bytes of every file it reads) and ``extra``."""
    files = [record.image] + [p for s in record.subjects for p in ((s.mask,) if s.mask else ()) + tuple(s.references)]
    payload = {
        "v": CACHE_VERSION, "caption": record.caption,
        "subjects": [[s.label, list(s.box), s.crop_from_target] for s in record.subjects],
        "files": [file_digest(p) for p in files], "extra": [str(e) for e in extra],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def module_fingerprint(*modules) -> str:
    """A cheap fingerprint of encoder weights: names, shapes, dtypes and the first and last values of each tensor."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            h.update(b"none")
            continue
        for name, t in m.state_dict().items():
            t = t.detach()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            if t.numel() and t.is_floating_point():
                flat = t.flatten()
                h.update(torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- caches


class DiskCache:
    """One kind of cached features: ``get(record, compute)`` loads or computes and stores a dict of tensors."""

    def __init__(self, root: Path, kind: str, fingerprint: str, extra: tuple = ()):
        self.folder = Path(root) / f"{kind}-{fingerprint}"
        self.extra = extra
        self.hits = 0
        self.misses = 0

    def path(self, record: Record) -> Path:
        key = record_digest(record, *self.extra)
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, record: Record, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        path = self.path(record)
        if path.exists():
            self.hits += 1
            return load_file(str(path))
        self.misses += 1
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in compute().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)  # atomic: an interrupted write never leaves a half file under the real name
        return tensors


@dataclass
class Encoders:
    """The frozen encoders (ComfyUI objects): VAE, CLIP text, CLIP vision, DINO (or None), and the crop geometry
    the adapter's image features use (``SdxlAdapter.trained_crop``)."""

    vae: object
    clip: object
    clip_vision: object
    dino: object | None
    image_crop: str = "stretch"


class FeatureStore:
    """Every cached feature of a dataset (see the module docstring); ``features(i)`` is record i's dict."""

    def __init__(self, records: Sequence[Record], encoders: Encoders, root: Path, resolution: int,
                 dino_resolution: int = 224, image_features: Callable | None = None):
        self.records = list(records)
        self.enc = encoders
        self.resolution = int(resolution)
        self.dino_resolution = int(dino_resolution)
        self.image_features = image_features  # ClipFeatures -> [N, G, E] (the adapter's choice of layer)
        vae_model = getattr(encoders.vae, "first_stage_model", None)
        clip_model = getattr(encoders.clip, "cond_stage_model", None)
        cv_model = getattr(encoders.clip_vision, "model", None)
        dino_model = getattr(encoders.dino, "model", None)
        self.caches = {
            "latent": DiskCache(root, "latent", module_fingerprint(vae_model), (self.resolution,)),
            "text": DiskCache(root, "text", module_fingerprint(clip_model)),
            "clip": DiskCache(root, "clip", module_fingerprint(cv_model), (encoders.image_crop,)),
        }
        if encoders.dino is not None:
            self.caches["dino"] = DiskCache(root, "dino", module_fingerprint(dino_model), (self.dino_resolution,))
        self._empty: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- encoders

    def _latent(self, p: Prepared) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            latent = self.enc.vae.encode(p.target[None])
        return {"latent": latent[0].float().clone()}

    def _text(self, caption: str, labels: Sequence[str]) -> dict[str, torch.Tensor]:
        from ..nodes.sdxl import phrase_embeddings

        clip = self.enc.clip
        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        out = {"context": cond[0].float().clone(), "pooled": pooled[0].float().clone()}
        if labels:
            out["phrases"] = phrase_embeddings(clip, tuple(labels)).float()
        return out

    def _clip(self, p: Prepared) -> dict[str, torch.Tensor]:
        from ..models.layout.subject import Subject
        from ..nodes.encoding import encode_subjects

        subjects, counts = [], []
        for s, refs in zip(p.record.subjects, p.references):
            counts.append(len(refs))
            subjects += [Subject(image=r[None], label=s.label) for r in refs]
        features = encode_subjects(self.enc.clip_vision, subjects)  # every crop geometry the encoder's adapters use
        feats = self.image_features(features) if self.image_features else features.layer(-2)
        return {"features": feats.float(), "counts": torch.tensor(counts, dtype=torch.float32)}

    def _dino(self, p: Prepared) -> dict[str, torch.Tensor]:
        from ..models.encoding.dino import encode_dino

        labels = [s.label for s in p.record.subjects]
        feats = encode_dino(self.enc.dino, p.target_crops, [None] * len(labels), labels, image=p.target[None],
                            resolution=self.dino_resolution)
        return {"cls": feats.cls.float(), "patch_mean": feats.image.patches[0].float().mean(0)}

    # ---------------------------------------------------------------- access

    def features(self, i: int) -> dict[str, torch.Tensor]:
        record = self.records[i]
        prepared: list[Prepared] = []

        def pixels() -> Prepared:
            if not prepared:
                prepared.append(prepare(record, self.resolution))
            return prepared[0]

        out: dict[str, torch.Tensor] = {}
        out.update(self.caches["latent"].get(record, lambda: self._latent(pixels())))
        labels = [s.label for s in record.subjects]
        out.update(self.caches["text"].get(record, lambda: self._text(record.caption, labels)))
        out.update(self.caches["clip"].get(record, lambda: self._clip(pixels())))
        if "dino" in self.caches:
            out.update(self.caches["dino"].get(record, lambda: self._dino(pixels())))
        return out

    def empty_text(self) -> dict[str, torch.Tensor]:
        """The empty prompt's encoding: what a text-dropped sample gets (classifier-free guidance training)."""
        if self._empty is None:
            self._empty = self._text("", ())
        return self._empty

    def fill(self, progress: Callable[[int, int], None] | None = None, indices: Sequence[int] | None = None) -> None:
        """Compute every missing entry now (before the first step); ``progress(done, total)`` after each record."""
        indices = range(len(self.records)) if indices is None else indices
        total = len(indices)
        for k, i in enumerate(indices):
            self.features(i)
            if progress is not None:
                progress(k + 1, total)

    def layout(self, i: int) -> tuple[Layout, tuple[int, int, int, int]]:
        """Record i's layout at the training resolution and its SDXL size conditioning (orig h, w, crop top, left)."""
        record = self.records[i]
        with Image.open(record.image) as im:
            w, h = im.size
        from PIL import ImageOps  # EXIF rotation swaps the sides

        with Image.open(record.image) as im:
            if ImageOps.exif_transpose(im).size != (w, h):
                w, h = h, w
        crop = SquareCrop(h, w, self.resolution)
        layout = Layout(self.resolution, self.resolution,
                        tuple(Region(box=crop.box(s.box), label=s.label) for s in record.subjects))
        top, left = crop.crop_coords()
        return layout, (h, w, top, left)


class FluxFeatureStore(FeatureStore):
    """The FLUX kinds of the same keyed, fingerprinted cache (DynaIP): the FLUX VAE's 16-channel latent of every
    target, the FLUX text encoding (T5 tokens and the CLIP-L pooled vector) of every caption, and the three CLIP
    layers HMoE fuses (``layers``, DynaIP's 10, 17, 24) of every reference, in the "pad" crop troupe-flux files use.
    """

    def __init__(self, records: Sequence[Record], encoders: Encoders, root: Path, resolution: int,
                 layers: str = "10,17,24"):
        self.records = list(records)
        self.enc = encoders
        self.resolution = int(resolution)
        self.layers = layers
        self.image_features = None
        vae_model = getattr(encoders.vae, "first_stage_model", None)
        clip_model = getattr(encoders.clip, "cond_stage_model", None)
        cv_model = getattr(encoders.clip_vision, "model", None)
        self.caches = {
            "latent": DiskCache(root, "flux-latent", module_fingerprint(vae_model), (self.resolution,)),
            "text": DiskCache(root, "flux-text", module_fingerprint(clip_model)),
            "clip": DiskCache(root, "clip-levels", module_fingerprint(cv_model), (encoders.image_crop, layers)),
        }
        self._empty = None

    def _text(self, caption: str, labels: Sequence[str]) -> dict[str, torch.Tensor]:
        clip = self.enc.clip
        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        return {"context": cond[0].float().clone(), "pooled": pooled[0].float().clone()}

    def _clip(self, p: Prepared) -> dict[str, torch.Tensor]:
        from ..models.layout.subject import Subject
        from ..nodes.encoding import encode_subjects

        subjects, counts = [], []
        for s, refs in zip(p.record.subjects, p.references):
            counts.append(len(refs))
            subjects += [Subject(image=r[None], label=s.label) for r in refs]
        features = encode_subjects(self.enc.clip_vision, subjects, layers=self.layers, crop=self.enc.image_crop)
        return {"levels": features.hidden.float(), "counts": torch.tensor(counts, dtype=torch.float32)}
