"""FLUX reference branch: reference tokens with their own timestep, LoRA and joint-attention mask.

MOSAIC (003) and AlignGen (002, Secs. 3.1-3.2) run each subject's reference image through the DiT as
extra tokens: VAE latents patchified like the noisy image (Eq. 2 of 002: ``MMA([x_t; c_text; c_ref])``),
modulated with their own timestep (t = 0), with a LoRA acting on the reference tokens only, at RoPE
positions that never coincide with the noisy image's, under a joint attention mask (Eq. 6 of 002).

This module holds the data: options, reference tokens and positions, the joint mask and the branch a
patched model carries; ``blocks.py`` runs the blocks and ``hooks.py`` holds the patch object.
Joint order inside every block: ``[text | noisy image | reference 1 | reference 2 | ...]``. Plain torch.

Axis legend: B batch, T text tokens, N image tokens, R reference tokens (all references), D hidden.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout.grid import token_grid
from .lora import ReferenceLoRA

REFERENCE_ATTENTION = ("joint", "self_cached")
AS_TRAINED, OFFSETS, SAME_INDEX = "as trained", "offset per reference (MOSAIC)", "same index (AlignGen)"
POSITION_MODES = (AS_TRAINED, OFFSETS, SAME_INDEX)
STATE_KEY = "troupe_reference_branch"
NEG = float("-inf")

AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ReferenceOptions:
    """How references join the joint attention (README, "FLUX reference branch").

    ``attention``: ``joint`` (MOSAIC: a reference attends to itself, the text and the noisy image; its
    stream is recomputed every step) or ``self_cached`` (a reference attends to itself only, so its K/V do
    not depend on the step and are computed once per run and condition; MOSAIC's ``kv_cache`` mode).
    ``selective_text``: Eq. 6 of 002, only each subject's label tokens (and S*) may attend to its reference.
    ``region``: image tokens attend only to the references of the subjects whose layout region holds them.
    """

    timestep: float = 0.0
    guidance: float = 1.0
    attention: str = "joint"
    selective_text: bool = False
    region: bool = False
    lora_strength: float = 1.0
    positions: str = OFFSETS

    def __post_init__(self) -> None:
        if self.attention not in REFERENCE_ATTENTION:
            raise ValueError(f"reference attention must be one of {REFERENCE_ATTENTION}, got {self.attention!r}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"reference positions must be one of {POSITION_MODES}, got {self.positions!r}")


def trained_positions(mode: str, lora_format: str | None) -> str:
    """What ``as trained`` means for a LoRA: MOSAIC files shift each reference (its inference.py), the pack's own
    (AlignGen-style, the training toolkit's layout) give every reference the same index (Sec. 4.2 of 002)."""
    if mode != AS_TRAINED:
        return mode
    return SAME_INDEX if lora_format == "troupe" else OFFSETS


# --------------------------------------------------------------------------- tokens and positions


def patchify(latent: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p], row-major, padded like ComfyUI's ``process_img``."""
    b, c, h, w = latent.shape
    ph, pw = (-h) % patch, (-w) % patch
    if ph or pw:
        latent = F.pad(latent, (0, pw, 0, ph), mode="circular")
    hh, ww = latent.shape[-2] // patch, latent.shape[-1] // patch
    x = latent.reshape(b, c, hh, patch, ww, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, hh * ww, c * patch * patch)


def reference_positions(grids: Sequence[tuple[int, int]], column_offset: int = 0,
                        same_index: bool = False) -> list[torch.Tensor]:
    """RoPE ids [h*w, 3] per reference: (0, row, col - offset), offset = total width of references 1..i.

    ``same_index`` (AlignGen, Sec. 4.2 of 002): every reference at the same ids, left of the image by the widest.

    MOSAIC shifts reference i by ``-(i + 1) * width`` columns; with the noisy image at columns >= 0 and each
    reference left of the previous one, no two positions coincide (checked in the tests). ``column_offset``
    shifts them all further left (past the references of another branch in the same model).
    """
    out, offset = [], column_offset
    widest = max((w for _, w in grids), default=0)
    for h, w in grids:
        offset = column_offset + widest if same_index else offset + w
        rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
        cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) - offset
        out.append(torch.stack([torch.zeros(h, w), rows, cols], dim=-1).reshape(h * w, 3))
    return out


def image_positions(grid: tuple[int, int]) -> torch.Tensor:
    """The noisy image's RoPE ids [h*w, 3] as ComfyUI builds them (index 0, row, col)."""
    h, w = grid
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([torch.zeros(h, w), rows, cols], dim=-1).reshape(h * w, 3)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000, factor: float = 1000.0):
    """FLUX's sinusoidal timestep embedding (cos | sin of ``factor * t`` at geometric frequencies)."""
    t = factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, L, d] by FLUX's RoPE table pe [B, 1, L, d/2, 2, 2] (same arithmetic as ComfyUI)."""
    x_ = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0]
    out.addcmul_(pe[..., 1], x_[..., 1])
    return out.reshape(*x.shape).type_as(x)


def sdpa_attention(q, k, v, pe=None, mask=None, transformer_options=None) -> torch.Tensor:
    """Plain-torch joint attention with RoPE: [B, H, L, d] -> [B, L, H*d], the default for tests (the node passes
    ComfyUI's ``comfy.ldm.flux.math.attention``, which runs the user's attention backend)."""
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def prepare_reference_image(image: torch.Tensor, mask: torch.Tensor | None, size: int,
                            fill: float = 0.9) -> torch.Tensor:
    """A subject reference as MOSAIC feeds it: the subject on white (mask applied), cropped to the mask,
    centred on a white square where it fills ``fill`` of the side, resized to ``size``. [H, W, 3] -> [size, size, 3]."""
    img = image.float().clamp(0, 1)
    if mask is not None:
        m = mask.float().clamp(0, 1)[..., None]
        img = img * m + (1.0 - m)
        on = mask >= 0.5
        if bool(on.any()):
            rows, cols = torch.nonzero(on.any(1)).flatten(), torch.nonzero(on.any(0)).flatten()
            img = img[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
    h, w = img.shape[:2]
    side = max(1, round(max(h, w) / fill))
    canvas = torch.ones(side, side, 3)
    y0, x0 = (side - h) // 2, (side - w) // 2
    canvas[y0:y0 + h, x0:x0 + w] = img
    out = F.interpolate(canvas.permute(2, 0, 1)[None], size=(size, size), mode="bicubic", align_corners=False,
                        antialias=True)
    return out[0].permute(1, 2, 0).clamp(0, 1)


def find_token_positions(prompt_ids: Sequence[int], label_ids: Sequence[int]) -> list[int]:
    """Every position of every occurrence of the label's token ids inside the prompt's token ids."""
    n, found = len(label_ids), []
    if n == 0:
        return found
    for i in range(len(prompt_ids) - n + 1):
        if list(prompt_ids[i:i + n]) == list(label_ids):
            found.extend(range(i, i + n))
    return found


class LabelNotFound(ValueError):
    """A subject label that is not in the prompt's tokens."""


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text with a ComfyUI tokenizer (``tokenize_with_weights``), batches concatenated."""
    batches = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    return [t[0] for batch in batches for t in batch]


def label_positions(tokenizer, prompt: str, labels: Sequence[str]) -> tuple[list[list[int]], int]:
    """T5 positions of each label in the prompt (all occurrences of the label as written, in lower case and
    capitalised) and the prompt's token count, with ComfyUI's own tokenizer (FLUX: T5-XXL, 256 minimum)."""
    prompt_ids = token_ids(tokenizer, prompt)
    special = {getattr(tokenizer, "end_token", 1), getattr(tokenizer, "pad_token", 0)}
    out = []
    for label in labels:
        found: set[int] = set()
        for variant in dict.fromkeys((label, label.lower(), label.capitalize())):
            found |= set(find_token_positions(prompt_ids, [i for i in token_ids(tokenizer, variant)
                                                           if i not in special]))
        if not found:
            raise LabelNotFound(f"the subject label {label!r} is not in the prompt {prompt[:80]!r}")
        out.append(sorted(found))
    return out, len(prompt_ids)


# --------------------------------------------------------------------------- joint attention mask


@dataclass(frozen=True)
class MaskSpec:
    """Who sees whom: text length, image length, reference lengths and the subject of each reference."""

    n_txt: int
    n_img: int
    ref_lengths: tuple[int, ...]
    ref_subject: tuple[int, ...]
    concept_positions: tuple[tuple[int, ...], ...] | None = None  # per subject, T5 positions (selective)
    image_regions: torch.Tensor | None = None  # [S, n_img] bool (region restriction)
    self_only: bool = False  # references attend only to themselves
    weights: tuple[float, ...] | None = None  # per subject; log(weight) added to its reference columns
    blocked_text: tuple[int, ...] = ()  # text columns no token may attend (S* of an unconditional item)

    @property
    def length(self) -> int:
        return self.n_txt + self.n_img + sum(self.ref_lengths)

    def segments(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of text, image and each reference along the joint sequence."""
        out = [("text", 0, self.n_txt), ("image", self.n_txt, self.n_txt + self.n_img)]
        start = self.n_txt + self.n_img
        for i, n in enumerate(self.ref_lengths):
            out.append((f"reference {i + 1}", start, start + n))
            start += n
        return out


def allowed_matrix(spec: MaskSpec) -> torch.Tensor:
    """Bool [L, L] (query rows, key columns): True where attention is allowed (Eq. 6 of 002's M = 0)."""
    n_base = spec.n_txt + spec.n_img
    allowed = torch.zeros(spec.length, spec.length, dtype=torch.bool)
    allowed[:n_base, :n_base] = True
    segs = spec.segments()[2:]
    for r, (_, s, e) in enumerate(segs):
        subj = spec.ref_subject[r]
        allowed[s:e, s:e] = True  # a reference attends to itself, never to another reference
        if not spec.self_only:
            allowed[s:e, :n_base] = True
        txt_rows = torch.ones(spec.n_txt, dtype=torch.bool)
        if spec.concept_positions is not None:
            txt_rows = torch.zeros(spec.n_txt, dtype=torch.bool)
            pos = [p for p in spec.concept_positions[subj] if p < spec.n_txt]
            txt_rows[pos] = True
        img_rows = torch.ones(spec.n_img, dtype=torch.bool)
        if spec.image_regions is not None:
            img_rows = torch.zeros(spec.n_img, dtype=torch.bool)
            reg = spec.image_regions[subj]
            img_rows[: reg.shape[0]] = reg[: spec.n_img]
        allowed[: spec.n_txt, s:e] = txt_rows[:, None]
        allowed[spec.n_txt:n_base, s:e] = img_rows[:, None]
    return allowed


def additive_mask(spec: MaskSpec, dtype=torch.float32, device=None) -> torch.Tensor:
    """Float [L, L]: 0 where allowed (plus log(weight) on a subject's reference columns), -inf elsewhere."""
    allowed = allowed_matrix(spec)
    bias = torch.zeros(spec.length, spec.length)
    if spec.weights is not None:
        n_base = spec.n_txt + spec.n_img
        for r, (_, s, e) in enumerate(spec.segments()[2:]):
            w = spec.weights[spec.ref_subject[r]]
            bias[:n_base, s:e] = math.log(w) if w > 0 else NEG
    mask = torch.where(allowed, bias, torch.full_like(bias, NEG))
    blocked = [p for p in spec.blocked_text if p < spec.n_txt]
    if blocked:
        mask[:, blocked] = NEG
        mask[blocked, blocked] = 0.0  # a blocked token still sees itself (no empty softmax row)
    return mask.to(device=device, dtype=dtype)


def region_tokens(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Layout masks at the token grid [S, h, w] -> bool [S, h*w]: a token is in a region at >= half coverage."""
    return (masks >= threshold).flatten(1)


# --------------------------------------------------------------------------- the reference set (per node)


@dataclass
class ReferenceBranch:
    """Everything a patched model needs: reference latents, subjects, options, LoRA and the DiT to read.

    Never changed during sampling: what a run computes once (embedded reference tokens, RoPE table, masks
    and, in the ``self_cached`` mode, every block's reference K/V) lives in that run's state (``hooks.py``).
    """

    dit: object
    latents: list[torch.Tensor]  # each [C, h, w], already in the model's latent space
    ref_subject: list[int]
    options: ReferenceOptions
    concept_positions: list[list[int]] | None = None
    subject_weights: list[float] | None = None
    region_masks: Callable[[int, int], torch.Tensor] | None = None  # (h_tok, w_tok) -> [S, h_tok, w_tok]
    lora: ReferenceLoRA | None = None
    dem: object | None = None  # models.reference.dem.Alignment, applied to the context once per run and condition
    compute_dtype: object = None  # the DiT's compute dtype (manual cast), None: the DiT's own
    n_txt_hint: int = 256  # text length of the prompt the positions were found in (mask preview)

    @property
    def patch(self) -> int:
        return int(self.dit.patch_size)

    def grids(self) -> list[tuple[int, int]]:
        return [token_grid(int(lat.shape[-2]), int(lat.shape[-1]), self.patch) for lat in self.latents]

    @property
    def width(self) -> int:
        """Token columns all references take side by side (how far another branch's references shift)."""
        widths = [w for _, w in self.grids()]
        return max(widths, default=0) if self.options.positions == SAME_INDEX else sum(widths)

    def mask_spec(self, n_txt: int, n_img: int, img_grid: tuple[int, int] | None,
                  concept_positions: Sequence[Sequence[int]] | None = None,
                  blocked_text: Sequence[int] = ()) -> MaskSpec:
        grids = self.grids()
        regions = None
        if self.options.region and self.region_masks is not None and img_grid is not None:
            regions = region_tokens(self.region_masks(*img_grid))
        positions = concept_positions if concept_positions is not None else self.concept_positions
        concept = tuple(tuple(p) for p in positions) if (self.options.selective_text and positions) else None
        return MaskSpec(n_txt=n_txt, n_img=n_img, ref_lengths=tuple(h * w for h, w in grids),
                        ref_subject=tuple(self.ref_subject), concept_positions=concept, image_regions=regions,
                        self_only=self.options.attention == "self_cached",
                        weights=tuple(self.subject_weights) if self.subject_weights else None,
                        blocked_text=tuple(blocked_text))
