"""Learnable token S* and the Deviation Extraction Module (AlignGen: cross-modality prior alignment, Sec. 3.2).

S* is prepended to each subject's concept name; the DEM updates it from the concept tokens and the subject's
Redux tokens, and only S* is replaced:

    c' = c + SA(c)            (Eq. 3, self-attention over c_concept = [S*, concept tokens])
    c' = c' + CA(c', redux)   (Eq. 4, cross-attention, Redux tokens as keys and values)
    c' = c' + MLP(c')         (Eq. 5)
    S*' = c'[0]

Where S* lives. As in the paper, S* is a word embedding in T5's *input* space: a ``t5xxl`` textual-inversion
embedding file (``models/embeddings``, key ``t5xxl``, shape [1, D]) that the artist writes in the prompt as
``embedding:<name>`` right before each subject's label. ComfyUI's FLUX tokenizer puts the vector into T5's
input sequence, T5 encodes it with the prompt, and ``TokenAlignment`` reads T5's output at the S* position and
at the label's tokens (c_concept) and replaces the output at the S* position with S*' (Eqs. 3-5).

Legacy form (files written before S* moved): a DEM file with an ``s_star`` [D] vector in T5's *output* space,
inserted into the conditioning before each label after the text encoder, so T5 never contextualises it.
``Alignment`` keeps running those files exactly as before. Attention layers are pre-LayerNorm.

Weights (``format=troupe.dem`` in the safetensors metadata, ``heads`` optional, default 8; ``embedding``
optional: the name of the S* embedding trained with it): ``self_attn.{norm.weight, norm.bias, to_q.weight,
to_k.weight, to_v.weight, to_out.weight, to_out.bias}``; ``cross_attn.{norm_q.*, norm_kv.*, to_q.weight,
to_k.weight, to_v.weight, to_out.*}`` (to_q/k/v project to an inner width I, to_k / to_v take the Redux width,
to_out maps I back to D); ``mlp.{norm.*, fc1.weight, fc1.bias, fc2.weight, fc2.bias}``; legacy files also
hold ``s_star`` [D].
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapter_file import AdapterFormatError

REDUX_TOKENS = 729  # FLUX.1 Redux: SigLIP-384 27x27 patches, appended after the T5 tokens


class Attention(nn.Module):
    """Pre-LayerNorm multi-head attention ``to_out(softmax(q k^T / sqrt(d)) v)`` without the residual."""

    def __init__(self, dim: int, kv_dim: int, heads: int, *, cross: bool, inner: int | None = None, operations=nn):
        super().__init__()
        inner = inner or dim
        self.heads, self.cross = heads, cross
        if cross:
            self.norm_q, self.norm_kv = operations.LayerNorm(dim), operations.LayerNorm(kv_dim)
        else:
            self.norm = operations.LayerNorm(dim)
        self.to_q = operations.Linear(dim, inner, bias=False)
        self.to_k = operations.Linear(kv_dim, inner, bias=False)
        self.to_v = operations.Linear(kv_dim, inner, bias=False)
        self.to_out = operations.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.cross:
            q_in, kv_in = self.norm_q(x), self.norm_kv(context)
        else:
            q_in = kv_in = self.norm(x)
        b, n, _ = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.to_q(q_in)), split(self.to_k(kv_in)), split(self.to_v(kv_in))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    """Pre-LayerNorm two-layer GELU MLP (Eq. 5's MLP, without the residual)."""

    def __init__(self, dim: int, hidden: int, operations=nn):
        super().__init__()
        self.norm, self.fc1, self.fc2 = operations.LayerNorm(dim), operations.Linear(dim, hidden), operations.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class DeviationExtractionModule(nn.Module):
    """Eqs. 3-5 of 002 over c_concept [B, 1 + l, D] with Redux tokens [B, 729, Dr]; returns S*' [B, D].

    ``legacy_s_star``: the module also holds the legacy output-space S* vector (``s_star`` [D]); without it S*
    is a T5 input embedding kept in its own file (see the module docstring)."""

    def __init__(self, *, dim: int = 4096, redux_dim: int = 4096, heads: int = 8, mlp_ratio: float = 4.0,
                 inner: int | None = None, operations=nn, legacy_s_star: bool = True):
        super().__init__()
        if legacy_s_star:
            self.s_star = nn.Parameter(torch.zeros(dim))
        self.self_attn = Attention(dim, dim, heads, cross=False, inner=inner, operations=operations)
        self.cross_attn = Attention(dim, redux_dim, heads, cross=True, inner=inner, operations=operations)
        self.mlp = MLP(dim, round(dim * mlp_ratio), operations=operations)

    def forward(self, concept: torch.Tensor, redux: torch.Tensor) -> torch.Tensor:
        c = concept + self.self_attn(concept)  # Eq. 3
        c = c + self.cross_attn(c, redux)  # Eq. 4
        c = c + self.mlp(c)  # Eq. 5
        return c[:, 0]  # only S* is replaced

    @property
    def dim(self) -> int:
        return int(self.self_attn.to_q.weight.shape[1])

    @property
    def legacy(self) -> bool:
        """True for a DEM with the legacy output-space S* (``s_star`` in the file)."""
        return "s_star" in self._parameters


def load_dem(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> DeviationExtractionModule:
    """Build the DEM from its documented layout; missing / unexpected / mis-shaped keys are named. A file with
    ``s_star`` is the legacy form (S* in T5's output space); without it S* is a T5 input embedding file."""
    if "self_attn.to_q.weight" not in sd or "cross_attn.to_k.weight" not in sd:
        raise AdapterFormatError("not a DEM file: need self_attn.*, cross_attn.*, mlp.* (and s_star in the legacy "
                                 f"form; docs/reference-branch.md, 'S* and the DEM'); found {sorted(sd)[:6]}")
    legacy = "s_star" in sd
    dim = int(sd["s_star"].shape[0]) if legacy else int(sd["self_attn.to_q.weight"].shape[1])
    redux_dim = int(sd["cross_attn.to_k.weight"].shape[1])
    hidden = int(sd["mlp.fc1.weight"].shape[0]) if "mlp.fc1.weight" in sd else 4 * dim
    heads = int((metadata or {}).get("heads", 8))
    inner = int(sd["self_attn.to_q.weight"].shape[0])
    dem = DeviationExtractionModule(dim=dim, redux_dim=redux_dim, heads=heads, mlp_ratio=hidden / dim, inner=inner,
                                    legacy_s_star=legacy)
    expected = dem.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise AdapterFormatError(f"DEM file does not fit: missing keys {missing[:6]}, unexpected keys {unexpected[:6]}")
    bad = [f"{k} {tuple(sd[k].shape)} (need {tuple(v.shape)})" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise AdapterFormatError(f"DEM file has mis-shaped keys: {bad[:4]}")
    dem.load_state_dict({k: v.float() for k, v in sd.items()})
    return dem.eval().requires_grad_(False)


# --------------------------------------------------------------------------- inserting S* into a prompt


def insert_positions(label_positions: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """Where S* goes (before each subject's first label token) and every subject's concept positions
    ([S*, label tokens]) in the sequence after all insertions."""
    firsts = [min(p) for p in label_positions]
    order = sorted(range(len(firsts)), key=lambda j: firsts[j])
    star = [0] * len(firsts)
    for rank, j in enumerate(order):
        star[j] = firsts[j] + rank  # each earlier insertion shifts this one by 1
    concept = []
    for j, pos in enumerate(label_positions):
        shifted = [p + sum(1 for f in firsts if f <= p) for p in pos]
        concept.append([star[j]] + shifted)
    return star, concept


def insert_tokens(context: torch.Tensor, label_positions: Sequence[Sequence[int]], tokens: torch.Tensor):
    """context [B, T, D] with tokens [B, S, D] (one per subject) inserted before each subject's label."""
    star, _ = insert_positions(label_positions)
    firsts = [min(p) for p in label_positions]
    pieces, last = [], 0
    for j in sorted(range(len(firsts)), key=lambda j: firsts[j]):
        pieces += [context[:, last:firsts[j]], tokens[:, j:j + 1]]
        last = firsts[j]
    pieces.append(context[:, last:])
    return torch.cat(pieces, dim=1), star


@dataclass
class Alignment:
    """Legacy form (S* in T5's output space, inserted after the text encoder): cross-modality prior alignment
    at sampling time (Sec. 3.2 of 002), once per run and condition. Kept so older DEM files run unchanged.

    ``apply(context, is_cond, run)``: the T5 tokens (the first ``n_t5`` of the context) get S* inserted
    before every label; for conditional items S* is updated by the DEM from [S*, label tokens] and the
    subject's Redux tokens (the 729 tokens per subject that ComfyUI's StyleModelApply appended after the
    T5 tokens, in subject order), which are then removed from the context. Unconditional items get the
    raw S*, masked out for every token, so they behave as without it.
    """

    dem: DeviationExtractionModule
    label_positions: list[list[int]]
    n_t5: int
    _cache: dict = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo):
        return self  # weights are read-only; the cache is keyed by run

    def aligned_positions(self) -> list[list[int]]:
        """Every subject's concept positions ([S*, label tokens]) in the aligned context."""
        return insert_positions(self.label_positions)[1]

    @property
    def n_aligned(self) -> int:
        """Text tokens of the aligned context: the T5 tokens plus one inserted S* per subject."""
        return self.n_t5 + len(self.label_positions)

    def apply(self, context: torch.Tensor, is_cond: Sequence[bool], run=None):
        key = (id(run), tuple(is_cond), tuple(context.shape))
        hit = self._cache.get("entry")
        if hit is not None and hit[0] == key and hit[1] is run and torch.equal(hit[2], context):
            return hit[3]
        out = self.compute(context, is_cond)
        self._cache["entry"] = (key, run, context, out)
        return out

    def context_index(self, n_context: int) -> torch.Tensor:
        """For each token of the aligned context (T5 with S* inserted, Redux tokens removed), the index of the
        same token in the conditioning StyleModelApply made, or -1 for an inserted S*."""
        star, _ = insert_positions(self.label_positions)
        old = [i for i in range(self.n_t5)]
        for p in sorted(star):
            old.insert(p, -1)
        return torch.tensor(old + list(range(self.n_t5 + REDUX_TOKENS * len(self.label_positions), n_context)),
                            dtype=torch.long)

    def align_mask(self, mask: torch.Tensor, n_context: int) -> torch.Tensor:
        """The attention mask StyleModelApply's ``attn_bias`` mode made for ``[context | image]`` [B, L, L],
        re-indexed for the aligned context: the Redux rows and columns removed with their tokens, a zero (allowed)
        row and column for each S*; the image part unchanged."""
        n_img = mask.shape[-1] - n_context
        idx = torch.cat([self.context_index(n_context), torch.arange(n_context, n_context + n_img)]).to(mask.device)
        keep = idx >= 0
        out = mask.new_zeros(*mask.shape[:-2], idx.numel(), idx.numel())
        src = idx.clamp(min=0)
        picked = mask.index_select(-2, src).index_select(-1, src)
        both = keep[:, None] & keep[None, :]
        return torch.where(both, picked, out)

    def compute(self, context: torch.Tensor, is_cond: Sequence[bool]):
        n_subj = len(self.label_positions)
        need = self.n_t5 + REDUX_TOKENS * n_subj
        if any(is_cond) and context.shape[1] < need:
            raise ValueError(f"TroupeReferenceBranch: the DEM needs each subject's Redux tokens after the "
                             f"{self.n_t5} T5 tokens ({need} tokens in all), the conditioning has "
                             f"{context.shape[1]}: apply StyleModelApply (FLUX Redux) once per subject, in "
                             "subject order, to the positive conditioning, or choose dem = none")
        dem = self.dem.to(context.device, context.dtype)
        t5 = context[:, : self.n_t5]
        b = t5.shape[0]
        stars = dem.s_star[None, None].expand(b, n_subj, -1).clone()
        _, concept = insert_positions(self.label_positions)
        raw, star_pos = insert_tokens(t5, self.label_positions, stars)
        out = raw.clone()
        with torch.no_grad():
            for i, cond in enumerate(is_cond):
                if not cond:
                    continue
                for j in range(n_subj):
                    c_concept = raw[i:i + 1, concept[j]]
                    redux = context[i:i + 1, self.n_t5 + REDUX_TOKENS * j: self.n_t5 + REDUX_TOKENS * (j + 1)]
                    out[i, star_pos[j]] = dem(c_concept, redux)[0]
        positions = [concept if cond else [[] for _ in concept] for cond in is_cond]
        blocked = [[] if cond else list(star_pos) for cond in is_cond]
        return out, positions, blocked


# --------------------------------------------------------------------------- S* as a T5 input embedding


class EmbeddingsAsIds:
    """A view of a ComfyUI tokenizer whose embedding vectors (``embedding:<name>`` in the prompt) read as the id -1,
    so label positions are found in the same token sequence T5 receives."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.end_token = getattr(tokenizer, "end_token", 1)
        self.pad_token = getattr(tokenizer, "pad_token", 0)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        batches = self.tokenizer.tokenize_with_weights(text, return_word_ids=return_word_ids, **kwargs)
        return [[(t[0] if isinstance(t[0], numbers.Integral) else -1, *t[1:]) for t in batch] for batch in batches]


class StarNotFound(ValueError):
    """A subject label without the S* embedding token right before it."""


def star_positions(is_embedding: Sequence[bool], label_positions: Sequence[Sequence[int]],
                   labels: Sequence[str] | None = None) -> list[int]:
    """For each subject, the position of the S* embedding token: the one right before the first occurrence of
    its label that has one (Sec. 3.2 of 002: S* is prepended to the concept name). ``is_embedding[i]`` says
    whether T5 input position ``i`` holds an embedding vector rather than a word token."""
    out = []
    for j, pos in enumerate(label_positions):
        name = repr(labels[j]) if labels else f"subject {j + 1}"
        taken = set(pos)
        starts = [p for p in sorted(taken) if p - 1 not in taken]
        found = [p - 1 for p in starts if p >= 1 and is_embedding[p - 1]]
        if not found:
            raise StarNotFound(f"no S* embedding right before the label {name}")
        star = found[0]
        if star >= 1 and is_embedding[star - 1]:
            raise StarNotFound(f"the embedding before the label {name} is more than one vector; S* is one T5 input "
                               "vector (a t5xxl embedding of shape [1, D])")
        out.append(star)
    return out


def align_tokens(dem: DeviationExtractionModule, t5: torch.Tensor, redux: Sequence[torch.Tensor],
                 stars: Sequence[int], concept: Sequence[Sequence[int]], rows: Sequence[int] | None = None):
    """T5's output [B, T, D] with S* replaced by S*' = DEM(c_concept, c_redux) (Eqs. 3-5 of 002) at each subject's
    S* position, for ``rows`` (all items when None); ``redux[j]`` [B, N, Dr] are subject j's Redux tokens and
    ``concept[j]`` = [S* position, label positions]. Differentiable (the trainer calls it with gradients)."""
    rows = list(range(t5.shape[0])) if rows is None else list(rows)
    out = t5.clone()
    if not rows:
        return out
    idx = torch.tensor(rows, device=t5.device)
    for j, star in enumerate(stars):
        c_concept = t5.index_select(0, idx)[:, list(concept[j])]
        out[idx, star] = dem(c_concept, redux[j].index_select(0, idx)).to(out.dtype)
    return out


@dataclass
class TokenAlignment:
    """Cross-modality prior alignment (Sec. 3.2 of 002) with S* a T5 input embedding: the conditioning holds T5's
    output for a prompt with ``embedding:<S*>`` before each label, then each subject's 729 Redux tokens (the
    StyleModelApply path, in subject order). For conditional items the output at each S* position is replaced by
    S*' from the DEM over that subject's [S*, label tokens] and Redux tokens; the Redux tokens are removed from
    every item (an unconditional item's tokens are left as its own prompt encoded them). Once per run and
    condition; same interface as ``Alignment``."""

    dem: DeviationExtractionModule
    stars: list[int]
    concept: list[list[int]]
    n_t5: int
    embedding: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo):
        return self  # weights are read-only; the cache is keyed by run

    apply = Alignment.apply

    def aligned_positions(self) -> list[list[int]]:
        return [list(c) for c in self.concept]

    @property
    def n_aligned(self) -> int:
        return self.n_t5

    def _need(self) -> int:
        return self.n_t5 + REDUX_TOKENS * len(self.stars)

    def context_index(self, n_context: int) -> torch.Tensor:
        """For each token of the aligned context, its index in the conditioning (the Redux tokens removed when
        the conditioning has them)."""
        if n_context < self._need():
            return torch.arange(n_context)
        return torch.cat([torch.arange(self.n_t5), torch.arange(self._need(), n_context)])

    def align_mask(self, mask: torch.Tensor, n_context: int) -> torch.Tensor:
        """StyleModelApply's ``attn_bias`` mask over ``[context | image]`` with the Redux rows and columns removed."""
        n_img = mask.shape[-1] - n_context
        idx = torch.cat([self.context_index(n_context), torch.arange(n_context, n_context + n_img)]).to(mask.device)
        return mask.index_select(-2, idx).index_select(-1, idx)

    def compute(self, context: torch.Tensor, is_cond: Sequence[bool]):
        n_subj = len(self.stars)
        if context.shape[1] < self._need():
            if any(is_cond):
                raise ValueError(f"TroupeReferenceBranch: the DEM needs each subject's Redux tokens after the "
                                 f"{self.n_t5} T5 tokens ({self._need()} tokens in all), the conditioning has "
                                 f"{context.shape[1]}: apply StyleModelApply (FLUX Redux) once per subject, in "
                                 "subject order, to the positive conditioning, or choose dem_name = none")
            return context, [[[] for _ in self.stars] for _ in is_cond], [[] for _ in is_cond]
        dem = self.dem.to(context.device, context.dtype)
        kept = context.index_select(1, self.context_index(context.shape[1]).to(context.device))
        redux = [context[:, self.n_t5 + REDUX_TOKENS * j: self.n_t5 + REDUX_TOKENS * (j + 1)] for j in range(n_subj)]
        rows = [i for i, c in enumerate(is_cond) if c]
        with torch.no_grad():
            out = align_tokens(dem, kept, redux, self.stars, self.concept, rows)
        positions = [self.aligned_positions() if cond else [[] for _ in self.stars] for cond in is_cond]
        return out, positions, [[] for _ in is_cond]
