"""FLUX reference branch, running: the per-call reference stream, the block maths and the patch objects.

Text and noisy-image tokens are computed with each block's own modules and ComfyUI's arithmetic, exactly
as the base block computes them; only what they may attend to changes (the joint mask of
``flux_reference``). References use the image modules plus the reference-only LoRA, with their own
modulation vector (MOSAIC, 003; Eq. 2 and Eq. 6 of AlignGen, 002). Plain torch: the DiT, its blocks and
the attention function (ComfyUI's ``comfy.ldm.flux.math.attention``) are handed in.

Axis legend: B batch, T text tokens, N image tokens, R reference tokens (all references), D hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .branch import (STATE_KEY, AttentionFn, ReferenceBranch, ReferenceOptions, additive_mask,
                             apply_rope, patchify, reference_positions, timestep_embedding, token_grid)
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
    masks: dict = field(default_factory=dict)

    @property
    def unmasked(self) -> bool:
        """True when the mask only separates the references (no selective text, regions, weights, blocked S*):
        then attention runs as one unmasked call for text + image and one per reference, the same result
        without an L x L mask (fused attention kernels stay usable)."""
        b, o = self.branch, self.branch.options
        return (not o.selective_text and not (o.region and b.region_masks is not None)
                and all(w == 1.0 for w in (b.subject_weights or ())) and not any(self.item_blocked or ()))

    def mask(self, n_txt: int, n_img: int, base_mask: torch.Tensor | None, batch: int, dtype, device):
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
        m = self.masks[key]
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


def joint_attention(stream: Stream, q, k, v, pe, rq, rk, rv, n_txt: int, attn_mask, attention: AttentionFn,
                    transformer_options=None) -> torch.Tensor:
    """Attention of ``[txt | img]`` (q, k, v, RoPE pe) and the references (rq, rk, rv; rq None when the K/V
    come rotated from the self_cached pass) under the joint mask: [B, T + N (+ R), H*d]."""
    n_base, batch = q.shape[2], q.shape[0]
    plain = stream.unmasked and attn_mask is None
    mask = None if plain else stream.mask(n_txt, n_base - n_txt, attn_mask, batch, q.dtype, q.device)
    if rq is None:  # self_cached: base queries over [base | cached reference K/V]
        return attention(apply_rope(q, pe), torch.cat((apply_rope(k, pe), rk), 2), torch.cat((v, rv), 2), pe=None,
                         mask=None if plain else mask[:, :n_base], transformer_options=transformer_options)
    if not plain:
        return attention(torch.cat((q, rq), 2), torch.cat((k, rk), 2), torch.cat((v, rv), 2),
                         pe=torch.cat((pe, stream.pe), 2), mask=mask, transformer_options=transformer_options)
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    rq, rk = apply_rope(rq, stream.pe), apply_rope(rk, stream.pe)
    outs = [attention(q, torch.cat((k, rk), 2), torch.cat((v, rv), 2), pe=None, mask=None,
                      transformer_options=transformer_options)]
    self_only, start = stream.branch.options.attention == "self_cached", 0
    for h, w in stream.branch.grids():  # each reference: itself (+ text and image), never another reference
        sl = slice(start, start + h * w)
        start += h * w
        keys, values = (rk[:, :, sl], rv[:, :, sl]) if self_only else (
            torch.cat((k, rk[:, :, sl]), 2), torch.cat((v, rv[:, :, sl]), 2))
        outs.append(attention(rq[:, :, sl], keys, values, pe=None, mask=None, transformer_options=transformer_options))
    return torch.cat(outs, dim=1)


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


def double_block(block, index: int, img, txt, vec, pe, attn_mask, stream: Stream, attention: AttentionFn,
                 transformer_options=None):
    """One FLUX double block over ``[txt | img | refs]``: txt and img exactly as the base block computes them."""
    _check_block(block)
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
    ref_out = None
    if stream.kv is not None:  # self_cached: reference K/V fixed for the run, no reference queries
        rk, rv = stream.kv[("double", index)]
        attn = joint_attention(stream, q, k, v, pe, None, rk, rv, n_txt, attn_mask, attention, transformer_options)
    else:
        m, rq, rk, rv = double_reference_qkv(block, stream.x, stream, name)
        attn = joint_attention(stream, q, k, v, pe, rq, rk, rv, n_txt, attn_mask, attention, transformer_options)
        ref_out = double_reference_out(block, stream.x, m, attn[:, n_txt + n_img:], stream, name)
    txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:n_txt + n_img]
    img = img + img_mod1.gate * block.img_attn.proj(img_attn)
    img = img + img_mod2.gate * block.img_mlp(torch.addcmul(img_mod2.shift, block.img_norm2(img), 1 + img_mod2.scale))
    txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
    txt = txt + txt_mod2.gate * block.txt_mlp(torch.addcmul(txt_mod2.shift, block.txt_norm2(txt), 1 + txt_mod2.scale))
    if ref_out is not None:
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


def single_block(block, index: int, x, vec, pe, attn_mask, n_txt: int, stream: Stream, attention: AttentionFn,
                 transformer_options=None):
    """One FLUX single block over ``[txt | img | refs]`` (x = [txt | img] as ComfyUI passes it)."""
    _check_block(block)
    name = f"single_blocks.{index}"
    mod, _ = block.modulation(vec)
    qkv, mlp = torch.split(block.linear1(torch.addcmul(mod.shift, block.pre_norm(x), 1 + mod.scale)),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = _heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    n = x.shape[1]
    ref_out = None
    if stream.kv is not None:
        rk, rv = stream.kv[("single", index)]
        attn = joint_attention(stream, q, k, v, pe, None, rk, rv, n_txt, attn_mask, attention, transformer_options)
    else:
        m, rq, rk, rv, rmlp = single_reference_in(block, stream.x, stream, name)
        attn = joint_attention(stream, q, k, v, pe, rq, rk, rv, n_txt, attn_mask, attention, transformer_options)
        ref_out = single_reference_out(block, stream.x, m, attn[:, n:], rmlp, stream, name)
    out = block.linear2(torch.cat((attn[:, :n], block.mlp_act(mlp)), 2))
    x = x + mod.gate * out
    if ref_out is not None:
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
    tokens = torch.cat([patchify(l[None].to(device, dtype), branch.patch) for l in branch.latents], dim=1)
    return _lin(branch.dit.img_in, tokens, lora, "img_in", branch.options.lora_strength)


def reference_pe(branch: ReferenceBranch, batch: int, device) -> torch.Tensor:
    ids = torch.cat(reference_positions(branch.grids()), dim=0).to(device)
    return branch.dit.pe_embedder(ids[None].expand(batch, -1, -1))


def self_cached_kv(branch: ReferenceBranch, stream: Stream, attention: AttentionFn, transformer_options=None):
    """Run the references alone (each attends to itself only) through every block; keep each block's K/V."""
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
        kv[("double", i)] = (k_rot, v)
        x = double_reference_out(block, x, m, own(apply_rope(q, stream.pe), k_rot, v), stream, f"double_blocks.{i}")
    for i, block in enumerate(dit.single_blocks):
        m, q, k, v, mlp = single_reference_in(block, x, stream, f"single_blocks.{i}")
        k_rot = apply_rope(k, stream.pe)
        kv[("single", i)] = (k_rot, v)
        x = single_reference_out(block, x, m, own(apply_rope(q, stream.pe), k_rot, v), mlp, stream,
                                 f"single_blocks.{i}")
    return kv


def prepare_stream(branch: ReferenceBranch, x: torch.Tensor, y: torch.Tensor | None, attention: AttentionFn,
                   run_token=None, transformer_options=None, item_positions=None, item_blocked=None) -> Stream:
    """The reference stream for one model call on noisy latents x [B, C, H, W] (once-per-run parts cached).

    ``run_token`` identifies the sampling run (ComfyUI's ``sample_sigmas`` tensor): the embedded reference
    tokens and, in the ``self_cached`` mode, every block's reference K/V are computed once per run and
    condition (pooled vector), then reused at every step.
    """
    dtype, device, batch = x.dtype, x.device, x.shape[0]
    if branch._cache.get("run") is not run_token or run_token is None:
        branch._cache = {"run": run_token, "entries": []}
    lora = branch.lora.to(device, dtype) if branch.lora is not None else None
    vec = reference_vec(branch.dit, y, batch, branch.options, dtype, device)
    pe_cache = branch._cache.setdefault("pe", {})
    if (batch, str(device)) not in pe_cache:
        pe_cache[(batch, str(device))] = reference_pe(branch, batch, device)
    pe = pe_cache[(batch, str(device))]
    img_grid = token_grid(tuple(x.shape[-2:]), branch.patch)
    entries = branch._cache["entries"]
    tokens = None
    for entry in entries:
        if entry["tokens"] is not None and entry["tokens"].dtype == dtype and entry["tokens"].device == device:
            tokens = entry["tokens"]
            break
    if tokens is None:
        tokens = reference_tokens(branch, lora, dtype, device)
    stream = Stream(branch, tokens.expand(batch, -1, -1), vec, pe, img_grid, lora,
                    item_positions=item_positions, item_blocked=item_blocked,
                    masks=branch._cache.setdefault("masks", {}))
    if branch.options.attention == "self_cached":
        for entry in entries:
            if entry["kv"] is not None and entry["vec"].shape == vec.shape and torch.equal(entry["vec"], vec):
                stream.kv = entry["kv"]
                break
        if stream.kv is None:
            stream.kv = self_cached_kv(branch, stream, attention, transformer_options)
            entries.append({"tokens": tokens, "vec": vec, "kv": stream.kv})
        stream.x = None
    elif not entries:
        entries.append({"tokens": tokens, "vec": vec, "kv": None})
    if len(entries) > 8:
        del entries[:-8]
    return stream


# --------------------------------------------------------------------------- ComfyUI patch objects


class ReferenceBlockPatch:
    """``patches_replace["dit"][(kind + "_block", i)]``: runs the block over [txt | img | refs].

    When the model already had a replace patch at this key (e.g. the FLUX adapter's), it is kept as
    ``prev`` and called with this joint block as its ``original_block``, so both act. Without a reference
    stream in ``transformer_options`` (a model call this branch did not prepare) the block runs unchanged.
    """

    def __init__(self, branch: ReferenceBranch, kind: str, index: int, attention: AttentionFn, prev=None):
        self.branch, self.kind, self.index, self.attention, self.prev = branch, kind, index, attention, prev

    def __call__(self, args: dict, extra: dict) -> dict:
        inner = extra["original_block"]
        states = (args.get("transformer_options") or {}).get(STATE_KEY) or {}
        stream = states.get(id(self.branch))
        if stream is None:
            return self.prev(args, extra) if self.prev is not None else inner(args)

        def joint(a: dict) -> dict:
            to = a.get("transformer_options")
            if self.kind == "double":
                block = self.branch.dit.double_blocks[self.index]
                img, txt = double_block(block, self.index, a["img"], a["txt"], a["vec"], a["pe"], a.get("attn_mask"),
                                        stream, self.attention, to)
                return {"img": img, "txt": txt}
            block = self.branch.dit.single_blocks[self.index]
            img = single_block(block, self.index, a["img"], a["vec"], a["pe"], a.get("attn_mask"), stream.n_txt,
                               stream, self.attention, to)
            return {"img": img}

        return self.prev(args, {**extra, "original_block": joint}) if self.prev is not None else joint(args)


class ReferenceModelWrapper:
    """``model_function_wrapper``: prepares the reference stream for one model call, then drops it.

    The stream lives in this call's own copy of ``transformer_options`` (never in the model), so nothing
    survives the call, an interrupted run included. A previous wrapper is kept and called inside.
    """

    def __init__(self, branch: ReferenceBranch, attention: AttentionFn, prev=None):
        self.branch, self.attention, self.prev = branch, attention, prev

    def __call__(self, apply_model, params: dict):
        if not self.branch.latents:  # no references: the model runs exactly as without this wrapper
            if self.prev is not None:
                return self.prev(apply_model, params)
            return apply_model(params["input"], params["timestep"], **params["c"])
        x, c = params["input"], dict(params["c"])
        to = dict(c.get("transformer_options") or {})
        cond_or_uncond = list(params.get("cond_or_uncond") or [0])
        per_chunk = max(1, x.shape[0] // max(1, len(cond_or_uncond)))
        is_cond = [cu == 0 for cu in cond_or_uncond for _ in range(per_chunk)]
        branch = self.branch
        item_positions = item_blocked = None
        if branch.dem is not None:
            c["c_crossattn"], item_positions, item_blocked = branch.dem.apply(c["c_crossattn"], is_cond,
                                                                              to.get("sample_sigmas"))
        elif branch.options.selective_text and branch.concept_positions is not None:
            empty = [[] for _ in branch.concept_positions]
            item_positions = [branch.concept_positions if cond else empty for cond in is_cond]
        stream = prepare_stream(branch, x.to(branch_dtype(branch)), c.get("y"), self.attention,
                                run_token=to.get("sample_sigmas"), transformer_options=to,
                                item_positions=item_positions, item_blocked=item_blocked)
        stream.n_txt = int(c["c_crossattn"].shape[1])
        to[STATE_KEY] = {**(to.get(STATE_KEY) or {}), id(branch): stream}
        c["transformer_options"] = to
        params = {**params, "c": c}
        try:
            if self.prev is not None:
                return self.prev(apply_model, params)
            return apply_model(params["input"], params["timestep"], **c)
        finally:
            stream.x = stream.kv = None
            stream.masks = {}  # the run's cache keeps the masks for the next steps


def branch_dtype(branch: ReferenceBranch):
    """The dtype the DiT computes in (its manual-cast dtype when the weights are stored narrower)."""
    return getattr(branch, "compute_dtype", None) or getattr(branch.dit, "dtype", None) or torch.float32


class ReleaseWrapper:
    """OUTER_SAMPLE wrapper (in the clone's own model_options): drops the branch's per-run cache when
    sampling ends, interrupted or not, so nothing stays between runs."""

    def __init__(self, branch: ReferenceBranch):
        self.branch = branch

    def __call__(self, executor, *args, **kwargs):
        self.branch._cache = {}
        try:
            return executor(*args, **kwargs)
        finally:
            self.branch._cache = {}


OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


def install(patcher, branch: ReferenceBranch, attention: AttentionFn) -> None:
    """Patch a CLONED ComfyUI ModelPatcher with ComfyUI's setters: a block replacement per double/single
    block and the model-function wrapper, keeping (and calling inside ours) any already there; plus an
    outer-sample wrapper in the clone's model_options that releases the per-run cache."""
    opts = patcher.model_options
    existing = opts.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for kind, blocks in (("double", branch.dit.double_blocks), ("single", branch.dit.single_blocks)):
        for i in range(len(blocks)):
            prev = existing.get((f"{kind}_block", i))
            patcher.set_model_patch_replace(ReferenceBlockPatch(branch, kind, i, attention, prev=prev),
                                            "dit", f"{kind}_block", i)
    patcher.set_model_unet_function_wrapper(
        ReferenceModelWrapper(branch, attention, prev=opts.get("model_function_wrapper")))
    wrappers = patcher.model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
    wrappers.setdefault(OUTER_SAMPLE, {})[f"{STATE_KEY}_{id(branch)}"] = [ReleaseWrapper(branch)]


def find_branch(model_options: dict) -> ReferenceBranch | None:
    """The reference branch installed in a model's options (the outermost one), if any."""
    wrapper = model_options.get("model_function_wrapper")
    while wrapper is not None:
        if isinstance(wrapper, ReferenceModelWrapper):
            return wrapper.branch
        wrapper = getattr(wrapper, "prev", None)
    return None
