"""FLUX reference branch, hooks: the patch object a model carries and the per-call reference stream.

``ReferencePatch`` is what ``nodes/lifecycle.py`` installs: ``model_function`` (the model-function wrapper)
prepares this branch's reference stream for one model call and puts it in that call's own copy of
``transformer_options``; ``dit_block`` (every double and single block) runs the block over ``[txt | img |
references of every stream]``. The patch never changes while sampling: what a run computes once (embedded
reference tokens, RoPE table, masks, DEM output, the ``self_cached`` K/V) goes in the ``run`` dict the host
hands in, emptied when the run ends. Plain torch.

Chains: a replace patch already at a block (the FLUX adapter) is kept and called with the joint block as
its ``original_block``. Several reference branches on one model (two nodes in a chain) join one joint
attention: the outermost block hook runs every prepared stream, each branch's references placed left of the
previous branch's, and tells the inner ones (``JOINT`` in ``extra``) to pass the call on.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from ..attention_record import RUN_KEY, AttentionRecorder, subject_mass
from ..layout.grid import token_grid
from ..setup_progress import setup_done
from .blocks import Stream, double_block, reference_pe, reference_tokens, reference_vec, self_cached_kv, single_block
from .branch import STATE_KEY, AttentionFn, ReferenceBranch, sdpa_attention

JOINT = "troupe_reference_joint"  # in a block hook's ``extra``: its original block already runs every stream
MAX_ENTRIES = 8  # conditions (pooled vectors) a run keeps the reference tokens / K/V of
STREAM_POINT = "model_function"  # the setup progress point of the stream prepared in the model-function hook


def block_points(dit) -> list[tuple[str, int]]:
    """The DiT block hook points of a branch (``patches_replace["dit"]`` keys), for the setup progress."""
    return ([("double_block", i) for i in range(len(dit.double_blocks))]
            + [("single_block", i) for i in range(len(dit.single_blocks))])


def branch_dtype(branch: ReferenceBranch):
    """The dtype the DiT computes in (its manual-cast dtype when the weights are stored narrower)."""
    return getattr(branch, "compute_dtype", None) or getattr(branch.dit, "dtype", None) or torch.float32


def run_lora(branch: ReferenceBranch, run: dict, device, dtype):
    """The branch's LoRA on the model's device and dtype, moved once per run and kept in the run's state only."""
    if branch.lora is None:
        return None
    key = ("lora", str(device), dtype)
    if key not in run:
        run[key] = dataclasses.replace(branch.lora, _moved={}).to(device, dtype)  # the shared LoRA stays as it is
    return run[key]


def prepare_stream(branch: ReferenceBranch, x: torch.Tensor, y: torch.Tensor | None, attention: AttentionFn,
                   run: dict | None = None, transformer_options=None, item_positions=None, item_blocked=None,
                   column_offset: int = 0) -> Stream:
    """The reference stream for one model call on noisy latents x [B, C, H, W] (once-per-run parts in ``run``).

    The embedded reference tokens and, in the ``self_cached`` mode, every block's reference K/V are computed
    once per run and condition (pooled vector), then reused at every step; ``column_offset`` places the
    references left of another branch's (``ReferenceBranch.width`` columns each).
    """
    run = {} if run is None else run
    dtype, device, batch = x.dtype, x.device, x.shape[0]
    lora = run_lora(branch, run, device, dtype)
    vec = reference_vec(branch.dit, y, batch, branch.options, dtype, device)
    pe_cache = run.setdefault("pe", {})
    pe_key = (batch, str(device), column_offset)
    if pe_key not in pe_cache:
        pe_cache[pe_key] = reference_pe(branch, batch, device, column_offset)
    pe = pe_cache[pe_key]
    img_grid = token_grid(int(x.shape[-2]), int(x.shape[-1]), branch.patch)
    entries = run.setdefault("entries", [])
    tokens = next((e["tokens"] for e in entries if e["tokens"].dtype == dtype and e["tokens"].device == device),
                  None)
    new = tokens is None
    if new:
        tokens = reference_tokens(branch, lora, dtype, device)
    stream = Stream(branch, tokens.expand(batch, -1, -1), vec, pe, img_grid, lora, item_positions=item_positions,
                    item_blocked=item_blocked, masks=run.setdefault("masks", {}))
    if branch.options.attention == "self_cached":
        stream.kv = next((e["kv"] for e in entries if e["kv"] is not None and e["offset"] == column_offset
                          and e["vec"].shape == vec.shape and torch.equal(e["vec"], vec)), None)
        if stream.kv is None:
            stream.kv = self_cached_kv(branch, stream, attention, transformer_options,
                                       done=functools.partial(setup_done, run))  # each block's K/V: one point
            entries.append({"tokens": tokens, "vec": vec, "kv": stream.kv, "offset": column_offset})
        stream.x = None
    else:
        if not entries:
            entries.append({"tokens": tokens, "vec": vec, "kv": None, "offset": column_offset})
        if new:  # joint: the blocks set nothing up (the references run through them at every step)
            setup_done(run, *block_points(branch.dit))
    if new:
        setup_done(run, STREAM_POINT)
    del entries[:-MAX_ENTRIES]
    return stream


def training_stream(branch: ReferenceBranch, y: torch.Tensor | None, batch: int, img_grid: tuple[int, int], dtype,
                    device, item_positions=None, item_blocked=None) -> Stream:
    """The reference stream of one training forward: the same tokens, modulation vector (t = ``options.timestep``)
    and RoPE table as ``prepare_stream``, built fresh from ``branch.lora`` (its parameters as they are, not a moved
    copy) with no run cache, so every tensor keeps its autograd graph; joint attention only (the ``self_cached`` K/V
    are an inference cache)."""
    if branch.options.attention != "joint":
        raise ValueError(f"training runs the joint reference attention, got {branch.options.attention!r}")
    lora = branch.lora
    vec = reference_vec(branch.dit, y, batch, branch.options, dtype, device)
    tokens = reference_tokens(branch, lora, dtype, device)
    return Stream(branch, tokens.expand(batch, -1, -1), vec, reference_pe(branch, batch, device), img_grid, lora,
                  item_positions=item_positions, item_blocked=item_blocked)


def aligned_context(branch: ReferenceBranch, run: dict, context: torch.Tensor, is_cond: list[bool]):
    """AlignGen's S* + DEM (Sec. 3.2 of 002) on the conditioning, computed once per run and condition."""
    key = (tuple(is_cond), tuple(context.shape))
    entries = run.setdefault("dem", [])
    for k, ctx, out in entries:
        if k == key and torch.equal(ctx, context):
            return out
    out = branch.dem.compute(context, is_cond)
    entries.append((key, context, out))
    del entries[:-4]
    return out


class RecordedAttention:
    """The blocks' attention function that also gives the recorder the image rows' mass on each subject's
    reference tokens (its first call over all keys: the joint attention of Eq. 6 of 002, mask included)."""

    def __init__(self, attention: AttentionFn, recorder: AttentionRecorder, streams: list[Stream], n_txt: int,
                 cond_rows: torch.Tensor) -> None:
        self.attention, self.recorder, self.n_txt, self.cond_rows = attention, recorder, n_txt, cond_rows
        owners = [torch.full((h * w,), int(subject)) for stream in streams  # the subject of each reference key
                  for (h, w), subject in zip(stream.branch.grids(), stream.branch.ref_subject)]
        self.ref_owners = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
        self.grid = streams[0].img_grid
        self.subjects = int(self.ref_owners.max()) + 1 if self.ref_owners.numel() else 0
        self.done = False

    def __call__(self, q, k, v, *args, mask=None, **kwargs):
        out = self.attention(q, k, v, *args, mask=mask, **kwargs)
        n_base = k.shape[2] - self.ref_owners.numel()
        gh, gw = self.grid
        if self.done or not self.subjects or n_base < self.n_txt + gh * gw or q.shape[2] < n_base:
            return out
        self.done = True
        rows = self.cond_rows.to(q.device)
        image = slice(self.n_txt, self.n_txt + gh * gw)
        owners = torch.cat([torch.full((n_base,), -1), self.ref_owners])
        bias = None if mask is None else mask.expand(q.shape[0], -1, -1).index_select(0, rows)[:, image]
        mass = subject_mass(q.index_select(0, rows)[:, :, image], k.index_select(0, rows), owners, self.subjects,
                            bias)
        buf = self.recorder.begin((gh, gw), len(rows), self.subjects, q.device)
        self.recorder.add(buf, mass)
        return out


def recorded_attention(attention: AttentionFn, run: dict, kind: str, streams: list[Stream], n_txt: int,
                       to: dict, batch: int) -> AttentionFn:
    """``attention``, or the recording one when this run records ``kind`` blocks at this step (cond rows only)."""
    recorder = run.get(RUN_KEY)
    sigmas = to.get("sigmas")
    sigma = float("inf") if sigmas is None else float(sigmas.flatten()[0])
    if recorder is None or not recorder.wants(kind, sigma) or streams[0].img_grid is None:
        return attention
    chunks = list(to.get("cond_or_uncond") or [0])
    per = max(1, batch // len(chunks))
    cond = torch.tensor([c == 0 for c in chunks for _ in range(per)][:batch])
    return RecordedAttention(attention, recorder, streams, n_txt, torch.nonzero(cond).flatten())


class ReferencePatch:
    """The reference branch on a model: a model-function hook and a hook for every double and single block."""

    def __init__(self, branch: ReferenceBranch, attention: AttentionFn = sdpa_attention) -> None:
        self.branch, self.attention = branch, attention

    def model_function(self, apply_model, params: dict, run: dict, previous: Callable | None = None):
        """Prepares this branch's stream for one model call (in the call's own options), then runs the model."""
        if not self.branch.latents:  # no references: the model runs exactly as without this wrapper
            if previous is not None:
                return previous(apply_model, params)
            return apply_model(params["input"], params["timestep"], **params["c"])
        x, c = params["input"], dict(params["c"])
        to = dict(c.get("transformer_options") or {})
        cond_or_uncond = list(params.get("cond_or_uncond") or [0])
        per_chunk = max(1, x.shape[0] // max(1, len(cond_or_uncond)))
        is_cond = [cu == 0 for cu in cond_or_uncond for _ in range(per_chunk)]
        branch = self.branch
        item_positions = item_blocked = None
        if branch.dem is not None:
            n_context = int(c["c_crossattn"].shape[1])
            c["c_crossattn"], item_positions, item_blocked = aligned_context(branch, run, c["c_crossattn"], is_cond)
            if c.get("attention_mask") is not None:  # StyleModelApply's attn_bias: sized for the Redux tokens
                c["attention_mask"] = branch.dem.align_mask(c["attention_mask"], n_context)
        elif branch.options.selective_text and branch.concept_positions is not None:
            empty = [[] for _ in branch.concept_positions]
            item_positions = [branch.concept_positions if cond else empty for cond in is_cond]
        outer = to.get(STATE_KEY) or {}  # streams of reference branches outside this one, already prepared
        stream = prepare_stream(branch, x.to(branch_dtype(branch)), c.get("y"), self.attention, run, to,
                                item_positions, item_blocked, sum(s.branch.width for s in outer.values()))
        stream.n_txt = int(c["c_crossattn"].shape[1])
        to[STATE_KEY] = {**outer, id(self): stream}
        c["transformer_options"] = to
        params = {**params, "c": c}
        try:
            if previous is not None:
                return previous(apply_model, params)
            return apply_model(params["input"], params["timestep"], **c)
        finally:
            stream.x = stream.kv = None
            stream.masks, stream.joint_masks = {}, {}  # the run's state keeps the masks for the next steps

    def dit_block(self, block: tuple[str, int], args: dict, extra: dict, run: dict,
                  previous: Callable | None = None) -> dict:
        """Runs the block over ``[txt | img | every stream's references]``; without streams, unchanged."""
        inner = extra["original_block"]
        streams = list(((args.get("transformer_options") or {}).get(STATE_KEY) or {}).values())
        if extra.get(JOINT) or not streams:
            return previous(args, extra) if previous is not None else inner(args)
        kind, index = block[0].removesuffix("_block"), int(block[1])
        dit = self.branch.dit

        def joint(a: dict) -> dict:
            to = a.get("transformer_options")
            n_txt = a["txt"].shape[1] if kind == "double" else streams[0].n_txt
            attention = recorded_attention(self.attention, run, kind, streams, n_txt, to or {}, a["img"].shape[0])
            if kind == "double":
                img, txt = double_block(dit.double_blocks[index], index, a["img"], a["txt"], a["vec"], a["pe"],
                                        a.get("attn_mask"), streams, attention, to)
                return {"img": img, "txt": txt}
            img = single_block(dit.single_blocks[index], index, a["img"], a["vec"], a["pe"], a.get("attn_mask"),
                               streams[0].n_txt, streams, attention, to)
            return {"img": img}

        return previous(args, {**extra, "original_block": joint, JOINT: True}) if previous is not None else joint(args)
