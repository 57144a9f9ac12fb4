"""FLUX reference branch, block maths: the per-call reference stream, the joint attention and the blocks.

Text and noisy-image tokens are computed with each block's own modules and ComfyUI's arithmetic, exactly
as the base block computes them; only what they may attend to changes (the joint mask of ``branch.py``).
References use the image modules plus the reference-only LoRA, with their own modulation vector (MOSAIC,
003; Eq. 2 and Eq. 6 of AlignGen, 002). Several streams (chained reference branches) join one joint
attention, each reference seeing only itself, the text and the image. Plain torch: the DiT, its blocks and
the attention function (ComfyUI's ``comfy.ldm.flux.math.attention``, so the user's backend runs it) are
handed in; the hooks that run these blocks are in ``hooks.py``.

Axis legend: B batch, T text tokens, N image tokens, R reference tokens (all references), D hidden.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .branch import (
    SAME_INDEX,
    AttentionFn,
    ReferenceBranch,
    ReferenceOptions,
    additive_mask,
    apply_rope,
    patchify,
    reference_positions,
    timestep_embedding,
)
from .lora import ReferenceLoRA

# --------------------------------------------------------------------------- per-forward state


@dataclass
class Stream:
    """The reference stream of one model call: hidden states, modulation vector, RoPE table, mask, K/V."""

    branch: ReferenceBranch
    x: torch.Tensor | None  # [B, R, D]; None when the K/V come from the cache
    vec: torch.Tensor  # [B, D], t = options.timestep
    pe: torch.Tensor  # [B, 1, R, d/2, 2, 2]
    img_grid: tuple[int, int]
    lora: ReferenceLoRA | None
    kv: dict | None = None  # ("double"|"single", i) -> (k with RoPE, v) in the self_cached mode
    item_positions: list | None = None  # per batch item: concept positions per subject (None: the branch's)
    item_blocked: list | None = None  # per batch item: text columns nobody attends
    n_txt: int | None = None
    masks: dict = field(default_factory=dict)  # the run's masks of this branch (shared by the run's calls)
    joint_masks: dict = field(default_factory=dict)  # this call's masks over several streams

    @property
    def unmasked(self) -> bool:
        """True when the mask only separates the references (no selective text, regions, weights, blocked S*):
        then attention runs as one unmasked call for text + image and one per reference, the same result
        without an L x L mask (fused attention kernels stay usable)."""
        b, o = self.branch, self.branch.options
        return (not o.selective_text and not (o.region and b.region_masks is not None)
                and all(w == 1.0 for w in (b.subject_weights or ())) and not any(self.item_blocked or ()))

    def mask(self, n_txt: int, n_img: int, batch: int, dtype, device) -> torch.Tensor:
        """This stream's additive mask [B, T + N + R, T + N + R] (Eq. 6 of 002), built once per run and shape."""
        key = (n_txt, n_img, batch, self.img_grid, repr(self.item_positions), repr(self.item_blocked), dtype,
               str(device))
        if key not in self.masks:
            built: dict = {}
            rows = []
            for b in range(batch):
                pos = self.item_positions[b] if self.item_positions else None
                blocked = tuple(self.item_blocked[b]) if self.item_blocked else ()
                k = (repr(pos), blocked)
                if k not in built:
                    spec = self.branch.mask_spec(n_txt, n_img, self.img_grid, pos, blocked)
                    built[k] = additive_mask(spec, dtype=dtype, device=device)
                rows.append(built[k])
            self.masks[key] = torch.stack(rows)
        return self.masks[key]


def joint_mask(streams: Sequence[Stream], queries: Sequence[bool], n_txt: int, n_img: int,
               base_mask: torch.Tensor | None, batch: int, dtype, device) -> torch.Tensor:
    """Additive mask over ``[txt | img | refs of each stream]`` (Eq. 6 of 002 per stream, streams kept apart)."""
    n_base = n_txt + n_img
    own = [s.mask(n_txt, n_img, batch, dtype, device) for s in streams]
    if len(own) == 1 and queries[0]:
        m = own[0]
    else:
        key = (n_txt, n_img, batch, tuple(queries), dtype, str(device))
        cache = streams[0].joint_masks
        if key not in cache:
            lengths = [o.shape[-1] - n_base for o in own]
            rows = n_base + sum(n for n, q in zip(lengths, queries) if q)
            m = torch.full((batch, rows, n_base + sum(lengths)), float("-inf"), dtype=dtype, device=device)
            m[:, :n_base, :n_base] = sum(o[:, :n_base, :n_base] for o in own)
            r, c = n_base, n_base
            for o, n, q in zip(own, lengths, queries):
                m[:, :n_base, c:c + n] = o[:, :n_base, n_base:]
                if q:
                    m[:, r:r + n, :n_base] = o[:, n_base:, :n_base]
                    m[:, r:r + n, c:c + n] = o[:, n_base:, n_base:]
                    r += n
                c += n
            cache[key] = m
        m = cache[key]
    if base_mask is not None:  # a mask another patch set over [text | image]: keep it
        bm = base_mask[:, 0] if base_mask.ndim == 4 else base_mask
        bm = (bm[None] if bm.ndim == 2 else bm).expand(batch, -1, -1)
        m = m.clone()
        m[:, : bm.shape[-2], : bm.shape[-1]] += bm.to(m.dtype)
    return m


def _silu_vec(vec: torch.Tensor) -> torch.Tensor:
    return F.silu(vec[:, None, :] if vec.ndim == 2 else vec)


def _modulation(mod_module, vec: torch.Tensor, lora: ReferenceLoRA | None, name: str, strength: float):
    """FLUX ``Modulation`` with the reference LoRA on its ``lin``: chunks (shift, scale, gate) x 1 or 2."""
    v = _silu_vec(vec)
    out = mod_module.lin(v)
    if lora is not None:
        out = lora.apply(name, v, out, strength)
    return out.chunk(mod_module.multiplier, dim=-1)


def _lin(module, x, lora: ReferenceLoRA | None, name: str, strength: float) -> torch.Tensor:
    y = module(x)
    return lora.apply(name, x, y, strength) if lora is not None else y


def _heads(qkv: torch.Tensor, heads: int):
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


# (stream, reference q or None when the K/V come rotated from the self_cached pass, k, v)
RefQKV = tuple[Stream, "torch.Tensor | None", torch.Tensor, torch.Tensor]


def joint_attention(refs: Sequence[RefQKV], q, k, v, pe, n_txt: int, attn_mask, attention: AttentionFn,
                    transformer_options=None) -> torch.Tensor:
    """``[txt | img]`` and every stream's references under the joint mask -> [B, T + N + R with queries, H*d]."""
    n_base, batch = q.shape[2], q.shape[0]
    streams = [r[0] for r in refs]
    plain = attn_mask is None and all(s.unmasked for s in streams)
    qr, kr = apply_rope(q, pe), apply_rope(k, pe)
    rq = [None if r[1] is None else apply_rope(r[1], r[0].pe) for r in refs]
    rk = [r[2] if r[1] is None else apply_rope(r[2], r[0].pe) for r in refs]
    keys, values = torch.cat([kr, *rk], 2), torch.cat([v, *(r[3] for r in refs)], 2)
    if not plain:
        mask = joint_mask(streams, [r is not None for r in rq], n_txt, n_base - n_txt, attn_mask, batch, q.dtype,
                          q.device)
        return attention(torch.cat([qr, *(r for r in rq if r is not None)], 2), keys, values, pe=None, mask=mask,
                         transformer_options=transformer_options)
    outs = [attention(qr, keys, values, pe=None, mask=None, transformer_options=transformer_options)]
    for (stream, _, _, rv), q_s, k_s in zip(refs, rq, rk):
        if q_s is None:
            continue
        self_only, start = stream.branch.options.attention == "self_cached", 0
        for h, w in stream.branch.grids():  # each reference: itself (+ text and image), never another reference
            sl = slice(start, start + h * w)
            start += h * w
            ks, vs = (k_s[:, :, sl], rv[:, :, sl]) if self_only else (
                torch.cat((kr, k_s[:, :, sl]), 2), torch.cat((v, rv[:, :, sl]), 2))
            outs.append(attention(q_s[:, :, sl], ks, vs, pe=None, mask=None, transformer_options=transformer_options))
    return torch.cat(outs, dim=1)


def as_streams(streams: Stream | Sequence[Stream]) -> list[Stream]:
    return [streams] if isinstance(streams, Stream) else list(streams)


def _check_block(block) -> None:
    if not getattr(block, "modulation", True) or getattr(block, "flipped_img_txt", False):
        raise ValueError("the reference branch supports FLUX.1 blocks (per-block modulation, text before image); "
                         "this model uses global modulation or a flipped order")


# --------------------------------------------------------------------------- double block


def double_reference_qkv(block, ref, stream: Stream, name: str):
    s = stream.branch.options.lora_strength
    m = _modulation(block.img_mod, stream.vec, stream.lora, f"{name}.img_mod.lin", s)
    h = torch.addcmul(m[0], block.img_norm1(ref), 1 + m[1])
    q, k, v = _heads(_lin(block.img_attn.qkv, h, stream.lora, f"{name}.img_attn.qkv", s), block.num_heads)
    q, k = block.img_attn.norm(q, k, v)
    return m, q, k, v


def double_reference_out(block, ref, m, attn, stream: Stream, name: str):
    s, lora = stream.branch.options.lora_strength, stream.lora
    ref = ref + m[2] * _lin(block.img_attn.proj, attn, lora, f"{name}.img_attn.proj", s)
    h = torch.addcmul(m[3], block.img_norm2(ref), 1 + m[4])
    h = _lin(block.img_mlp[0], h, lora, f"{name}.img_mlp.0", s)
    h = _lin(block.img_mlp[2], block.img_mlp[1](h), lora, f"{name}.img_mlp.2", s)
    return ref + m[5] * h


def double_block(block, index: int, img, txt, vec, pe, attn_mask, streams: Stream | Sequence[Stream],
                 attention: AttentionFn, transformer_options=None):
    """One FLUX double block over ``[txt | img | refs]``: txt and img exactly as the base block computes them."""
    _check_block(block)
    streams = as_streams(streams)
    name = f"double_blocks.{index}"
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)
    img_q, img_k, img_v = _heads(block.img_attn.qkv(torch.addcmul(img_mod1.shift, block.img_norm1(img),
                                                                  1 + img_mod1.scale)), block.num_heads)
    img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)
    txt_q, txt_k, txt_v = _heads(block.txt_attn.qkv(torch.addcmul(txt_mod1.shift, block.txt_norm1(txt),
                                                                  1 + txt_mod1.scale)), block.num_heads)
    txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)
    n_txt, n_img = txt.shape[1], img.shape[1]
    q = torch.cat((txt_q, img_q), dim=2)
    k = torch.cat((txt_k, img_k), dim=2)
    v = torch.cat((txt_v, img_v), dim=2)
    refs, mods = [], []
    for stream in streams:
        if stream.kv is not None:  # self_cached: reference K/V fixed for the run, no reference queries
            refs.append((stream, None, *stream.kv[("double", index)]))
            mods.append(None)
        else:
            m, rq, rk, rv = double_reference_qkv(block, stream.x, stream, name)
            refs.append((stream, rq, rk, rv))
            mods.append(m)
    attn = joint_attention(refs, q, k, v, pe, n_txt, attn_mask, attention, transformer_options)
    outs, start = [], n_txt + n_img
    for (stream, rq, _, _), m in zip(refs, mods):
        if rq is not None:
            n = rq.shape[2]
            outs.append((stream, double_reference_out(block, stream.x, m, attn[:, start:start + n], stream, name)))
            start += n
    txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:n_txt + n_img]
    img = img + img_mod1.gate * block.img_attn.proj(img_attn)
    img = img + img_mod2.gate * block.img_mlp(torch.addcmul(img_mod2.shift, block.img_norm2(img), 1 + img_mod2.scale))
    txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
    txt = txt + txt_mod2.gate * block.txt_mlp(torch.addcmul(txt_mod2.shift, block.txt_norm2(txt), 1 + txt_mod2.scale))
    for stream, ref_out in outs:
        stream.x = ref_out
    return img, txt


# --------------------------------------------------------------------------- single block


def single_reference_in(block, ref, stream: Stream, name: str):
    s = stream.branch.options.lora_strength
    m = _modulation(block.modulation, stream.vec, stream.lora, f"{name}.modulation.lin", s)
    h = torch.addcmul(m[0], block.pre_norm(ref), 1 + m[1])
    qkv, mlp = torch.split(_lin(block.linear1, h, stream.lora, f"{name}.linear1", s),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = _heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    return m, q, k, v, mlp


def single_reference_out(block, ref, m, attn, mlp, stream: Stream, name: str):
    s = stream.branch.options.lora_strength
    out = _lin(block.linear2, torch.cat((attn, block.mlp_act(mlp)), 2), stream.lora, f"{name}.linear2", s)
    return ref + m[2] * out


def single_block(block, index: int, x, vec, pe, attn_mask, n_txt: int, streams: Stream | Sequence[Stream],
                 attention: AttentionFn, transformer_options=None):
    """One FLUX single block over ``[txt | img | refs]`` (x = [txt | img] as ComfyUI passes it)."""
    _check_block(block)
    streams = as_streams(streams)
    name = f"single_blocks.{index}"
    mod, _ = block.modulation(vec)
    qkv, mlp = torch.split(block.linear1(torch.addcmul(mod.shift, block.pre_norm(x), 1 + mod.scale)),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = _heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    n = x.shape[1]
    refs, parts = [], []
    for stream in streams:
        if stream.kv is not None:
            refs.append((stream, None, *stream.kv[("single", index)]))
            parts.append(None)
        else:
            m, rq, rk, rv, rmlp = single_reference_in(block, stream.x, stream, name)
            refs.append((stream, rq, rk, rv))
            parts.append((m, rmlp))
    attn = joint_attention(refs, q, k, v, pe, n_txt, attn_mask, attention, transformer_options)
    outs, start = [], n
    for (stream, rq, _, _), part in zip(refs, parts):
        if rq is not None:
            r = rq.shape[2]
            outs.append((stream, single_reference_out(block, stream.x, part[0], attn[:, start:start + r], part[1],
                                                      stream, name)))
            start += r
    out = block.linear2(torch.cat((attn[:, :n], block.mlp_act(mlp)), 2))
    x = x + mod.gate * out
    for stream, ref_out in outs:
        stream.x = ref_out
    return x


# --------------------------------------------------------------------------- stream preparation


def reference_vec(dit, y: torch.Tensor | None, batch: int, options: ReferenceOptions, dtype, device) -> torch.Tensor:
    """The references' modulation vector: time_in(t_ref) + guidance_in(g_ref) + vector_in(y)."""
    t = torch.full((batch,), float(options.timestep), device=device, dtype=dtype)
    vec = dit.time_in(timestep_embedding(t, 256).to(dtype))
    if dit.params.guidance_embed:
        g = torch.full((batch,), float(options.guidance), device=device, dtype=dtype)
        vec = vec + dit.guidance_in(timestep_embedding(g, 256).to(dtype))
    if dit.vector_in is not None:
        if y is None:
            y = torch.zeros(batch, dit.params.vec_in_dim, device=device, dtype=dtype)
        vec = vec + dit.vector_in(y[:, : dit.params.vec_in_dim].to(dtype))
    return vec


def reference_tokens(branch: ReferenceBranch, lora: ReferenceLoRA | None, dtype, device) -> torch.Tensor:
    """All references patchified and embedded by ``img_in`` (+ LoRA on x_embedder): [1, R, D]."""
    tokens = torch.cat([patchify(lat[None].to(device, dtype), branch.patch) for lat in branch.latents], dim=1)
    return _lin(branch.dit.img_in, tokens, lora, "img_in", branch.options.lora_strength)


def reference_pe(branch: ReferenceBranch, batch: int, device, column_offset: int = 0) -> torch.Tensor:
    """The references' RoPE table: positions left of the image and of ``column_offset`` columns of other streams."""
    same = branch.options.positions == SAME_INDEX
    ids = torch.cat(reference_positions(branch.grids(), column_offset, same_index=same), dim=0).to(device)
    return branch.dit.pe_embedder(ids[None].expand(batch, -1, -1))


def self_cached_kv(branch: ReferenceBranch, stream: Stream, attention: AttentionFn, transformer_options=None,
                   done: Callable[[tuple[str, int]], None] | None = None):
    """Run the references alone (each attends to itself only) through every block; keep each block's K/V
    (``done(("double_block" | "single_block", i))`` after each, for the host's setup progress)."""
    dit, kv = branch.dit, {}
    x = stream.x
    bounds, start = [], 0
    for h, w in branch.grids():
        bounds.append(slice(start, start + h * w))
        start += h * w

    def own(q, k, v):  # one unmasked call per reference: no reference sees another
        return torch.cat([attention(q[:, :, s], k[:, :, s], v[:, :, s], pe=None, mask=None,
                                    transformer_options=transformer_options) for s in bounds], dim=1)

    for i, block in enumerate(dit.double_blocks):
        m, q, k, v = double_reference_qkv(block, x, stream, f"double_blocks.{i}")
        k_rot = apply_rope(k, stream.pe)
        v = v.contiguous()  # a view of the whole fused qkv output: kept as is, the cache would hold 2x its size
        kv[("double", i)] = (k_rot, v)
        x = double_reference_out(block, x, m, own(apply_rope(q, stream.pe), k_rot, v), stream, f"double_blocks.{i}")
        if done is not None:
            done(("double_block", i))
    for i, block in enumerate(dit.single_blocks):
        m, q, k, v, mlp = single_reference_in(block, x, stream, f"single_blocks.{i}")
        k_rot = apply_rope(k, stream.pe)
        v = v.contiguous()  # a view of linear1's qkv + MLP output: kept as is, the cache would hold 4x its size
        kv[("single", i)] = (k_rot, v)
        x = single_reference_out(block, x, m, own(apply_rope(q, stream.pe), k_rot, v), mlp, stream,
                                 f"single_blocks.{i}")
        if done is not None:
            done(("single_block", i))
    return kv
