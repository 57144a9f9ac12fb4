"""FLUX block-replacement patch: decoupled image cross-attention with DDS and mask-guided injection (004).

Axis legend: B batch, N subjects, H heads, L rows (tokens) that receive the injection, T reference tokens,
d head width, D = H * d the DiT width, (h, w) the latent grid, (h', w') the image-token grid of 2x2 patches.

In every double and single block the patch adds, to the block's joint-attention output (before the block's
output projection, gate and MLP, as InstantX's FLUX IP-Adapter does) the term of Eq. 9 of 004:

    X = X_MMA + sum_i lambda_i * M_i (.) CA(X, C_i),   CA(X, C) = softmax(Q_X K_C^T / sqrt(d)) V_C   (Eq. 2)

with Q_X the block's own query (after its QK RMSNorm, before RoPE: taken from the block's attention call and
rotated back, so nothing is projected twice), K_C / V_C the adapter's projections of the
subject's reference tokens, M_i subject i's layout region averaged over each 2x2 latent patch, and
lambda_i = global weight x subject weight, zero outside [start, end] and for the uncond half of real CFG.

Dynamic Decoupling Strategy (Eqs. 4-5, Sec. 4.1): ``image branch only`` (the inference rule, default) adds the
term to the image tokens only (in single blocks, the image part of the joint stream); ``both branches`` also
adds sum_i lambda_i CA(T, C_i) to the text tokens (Eq. 5; text tokens have no place on the canvas, so M = 1).

The patch is plain torch (it reads the block's ``num_heads`` and ``flipped_img_txt`` and hooks ComfyUI's
``optimized_attention_override``); only ``nodes/flux.py`` talks to ComfyUI's patcher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .adapter import RESIDUAL, FluxImageAdapter
from ..layout.layout import Layout

IMAGE_ONLY = "image branch only"
BOTH = "both branches"
DDS_MODES: tuple[str, ...] = (IMAGE_ONLY, BOTH)
GEOMETRY_KEY = "troupe_flux_geometry"


@dataclass(frozen=True)
class InjectionParams:
    """What the artist chose: global weight, per-subject weights, sigma window, DDS mode, mask overlap."""

    weight: float = 1.0
    subject_weights: tuple[float, ...] = ()
    sigma_start: float = float("inf")  # sigma at start_percent (larger sigma = earlier)
    sigma_end: float = 0.0
    dds: str = IMAGE_ONLY

    def __post_init__(self) -> None:
        if self.dds not in DDS_MODES:
            raise ValueError(f"branches must be one of {DDS_MODES}, got {self.dds!r}")


# --------------------------------------------------------------------------- geometry and masks


def token_grid(latent_h: int, latent_w: int, patch: int = 2) -> tuple[int, int]:
    """The image-token grid of a latent, as ComfyUI's Flux pads it: ceil(size / patch) each way."""
    return (latent_h + patch // 2) // patch, (latent_w + patch // 2) // patch


def token_masks(layout: Layout, latent_h: int, latent_w: int, patch: int = 2) -> torch.Tensor:
    """M_i of Eq. 9 at the token grid [N, h' * w']: each region rendered on the latent grid, averaged over
    the real (unpadded) latent pixels of every patch x patch token."""
    masks = layout.masks(latent_h, latent_w)  # [N, h, w]
    gh, gw = token_grid(latent_h, latent_w, patch)
    pad = (0, gw * patch - latent_w, 0, gh * patch - latent_h)
    valid = F.pad(torch.ones(1, 1, latent_h, latent_w), pad)
    summed = F.avg_pool2d(F.pad(masks[:, None], pad), patch, divisor_override=1)
    count = F.avg_pool2d(valid, patch, divisor_override=1)
    return (summed / count)[:, 0].flatten(1)


# --------------------------------------------------------------------------- Eq. 9


@dataclass(frozen=True)
class TokenMasks:
    """M_i [N, L] on the rows that receive the injection, with each subject's nonzero rows (None: all rows)."""

    values: torch.Tensor
    rows: tuple[torch.Tensor | None, ...]

    @classmethod
    def of(cls, values: torch.Tensor) -> "TokenMasks":
        rows = []
        for m in values:
            r = torch.nonzero(m > 0).flatten()
            rows.append(None if r.numel() == m.numel() else r)
        return cls(values, tuple(rows))


def masked_cross_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                           lam: torch.Tensor, masks: TokenMasks | None,
                           lam_device: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i lambda_i * M_i (.) CA(q, C_i) [B, L, D] (Eq. 9 of 004, CA of Eq. 2); rows outside M_i are skipped.

    q [B, H, L, d]; keys / values: one [H, T, d] per subject; lam [B, N] (CPU; ``lam_device``: the same on q's
    device, to avoid a copy per call); masks: M_i or None (all 1).
    """
    if lam_device is None:
        lam_device = lam.to(device=q.device, dtype=q.dtype)
    b, h, n_rows, d = q.shape
    out = q.new_zeros(b, n_rows, h * d)
    for i, (k, v) in enumerate(zip(keys, values)):
        li = lam[:, i]
        if not bool(li.any()):
            continue
        scale = lam_device[:, i].view(b, 1, 1)
        rows, m = None, None
        if masks is not None:
            rows, m = masks.rows[i], masks.values[i]
            if rows is not None and rows.numel() == 0:
                continue
            m = (m if rows is None else m.index_select(0, rows)).view(1, -1, 1)
        qi = q if rows is None else q.index_select(2, rows)
        a = F.scaled_dot_product_attention(qi, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
        a = a.transpose(1, 2).reshape(b, -1, h * d) * scale
        if m is not None:
            a = a * m.to(a.dtype)
        if rows is None:
            out += a
        else:
            out.index_add_(1, rows, a)
    return out


# --------------------------------------------------------------------------- per-run state


class FluxInjection:
    """Everything one TroupeApplyFLUX output needs: adapter, reference tokens, layout and the per-run cache.

    One object per Apply node run, referenced only by the clone it patches (deep copies of the clone's
    model_options share it, which is what a clone of that clone should see). The cache holds K/V per block
    and masks per latent size for one sampling run and is emptied when the run ends (``release``).
    """

    def __init__(self, adapter: FluxImageAdapter, tokens: torch.Tensor, params: InjectionParams,
                 layout: Layout | None, model_double_blocks: int, patch_size: int = 2) -> None:
        self.adapter = adapter
        self.tokens = tokens.detach().float().cpu()  # C_i [N, T, C], computed once at apply time
        self.params = params
        self.layout = layout
        self.model_double_blocks = model_double_blocks
        self.patch_size = patch_size
        n = tokens.shape[0]
        sw = params.subject_weights or (1.0,) * n
        if len(sw) != n:
            raise ValueError(f"{len(sw)} subject weights for {n} subjects")
        self.lambdas = torch.tensor([params.weight * w for w in sw], dtype=torch.float32)  # lambda_i
        self.cache: dict[tuple, Any] = {}

    def __deepcopy__(self, memo: dict) -> "FluxInjection":
        return self  # shared, read-only between runs; the run cache is emptied after every run

    @property
    def num_subjects(self) -> int:
        return int(self.tokens.shape[0])

    def release(self) -> None:
        """Drop the run's K/V and masks (called when sampling ends)."""
        self.cache.clear()

    def kv(self, kind: str, index: int, device, dtype, head_dim: int) -> tuple[list, list]:
        """K_C, V_C [H, T, d] of every subject for one block, computed once per run on the model's device."""
        key = ("kv", kind, index, str(device), dtype)
        if key not in self.cache:
            c = self.adapter.config
            layer = self.adapter.layer(kind, index, self.model_double_blocks)
            k, v = layer.kv(self.tokens, head_dim, norm_v=c.norm_v, eps=c.norm_eps, norm_k=c.norm_k, device=device,
                            dtype=dtype)
            self.cache[key] = (list(k.unbind(0)), list(v.unbind(0)))
        return self.cache[key]

    def masks(self, latent_h: int, latent_w: int, device, dtype, text_rows: int = 0) -> TokenMasks | None:
        """M_i on [text rows (all 1, ``both branches``) | image tokens h' * w'] for this latent size, once per
        run (None without a layout: every subject everywhere)."""
        if self.layout is None:
            return None
        key = ("mask", latent_h, latent_w, text_rows, str(device), dtype)
        if key not in self.cache:
            m = token_masks(self.layout, latent_h, latent_w, self.patch_size)
            if text_rows:
                m = torch.cat([m.new_ones(m.shape[0], text_rows), m], dim=1)
            self.cache[key] = TokenMasks.of(m.to(device=device, dtype=dtype))
        return self.cache[key]

    def scales(self, transformer_options: dict, batch: int) -> torch.Tensor | None:
        """lambda [B, N] for this call: zero outside the sigma window and for uncond rows; None when all zero."""
        if not bool(self.lambdas.any()):
            return None
        sigmas = transformer_options.get("sigmas")
        chunks = transformer_options.get("cond_or_uncond")
        key = (tuple(chunks or ()), batch)
        last = self.cache.get("lam")
        if last is not None and last[0] is sigmas and last[1] == key:
            return last[2]  # the same call: the blocks of one forward share it (no device sync per block)
        lam = self._scales(sigmas, chunks, batch)
        self.cache["lam"] = (sigmas, key, lam)
        return lam

    def on_device(self, lam: torch.Tensor, device, dtype) -> torch.Tensor:
        """lambda on the model's device, copied once per forward (the blocks share it)."""
        last = self.cache.get("lam_device")
        if last is None or last[0] is not lam or last[1] != (str(device), dtype):
            last = (lam, (str(device), dtype), lam.to(device=device, dtype=dtype))
            self.cache["lam_device"] = last
        return last[2]

    def _scales(self, sigmas, chunks, batch: int) -> torch.Tensor | None:
        on = torch.ones(batch)
        if sigmas is not None:
            s = sigmas.detach().float().cpu().flatten()
            s = s.repeat_interleave(batch // s.numel()) if s.numel() != batch and batch % s.numel() == 0 else s
            if s.numel() == batch:
                on = ((s <= self.params.sigma_start) & (s >= self.params.sigma_end)).float()
        if chunks and batch % len(chunks) == 0:
            per = batch // len(chunks)
            cond = torch.tensor([0.0 if c == 1 else 1.0 for c in chunks]).repeat_interleave(per)
            on = on * cond  # real CFG: the uncond half gets no subject features
        lam = on[:, None] * self.lambdas[None, :]
        return lam if bool(lam.any()) else None


# --------------------------------------------------------------------------- attention hook


def unrope(q: torch.Tensor, pe: torch.Tensor | None, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of a RoPE-rotated query [B, H, L, d] turned back into the pre-RoPE query.

    ``pe`` [B or 1, 1, L, d/2, 2, 2] holds one 2x2 rotation per position and frequency (FLUX's RoPE); its
    inverse is the transpose. Without ``pe`` (no RoPE) the rows are returned as they are.
    """
    rows = q[:, :, start:start + count]
    if pe is None:
        return rows
    rot = pe[:, :, start:start + count].transpose(-1, -2)
    x = rows.to(rot.dtype).reshape(*rows.shape[:-1], -1, 1, 2)
    out = rot[..., 0] * x[..., 0] + rot[..., 1] * x[..., 1]
    return out.reshape(rows.shape).type_as(rows)


# (offset in the joint attention output, delta [B, n, D], stream of the block's output, offset in that stream)
Addition = tuple[int, torch.Tensor, str, int]


class AttentionHook:
    """``optimized_attention_override`` for one block call (chains one that was already set).

    On the block's joint attention it takes the block's own query (undoing RoPE: the query of Eq. 2 is the
    pre-RoPE one), computes the injection with ``compute`` and, unless ``add`` is False (XLabs, added after
    the block), adds it to the attention output. It acts once, on the first attention call whose query is
    [B, H, >= rows, d] (a previous block patch that runs other attention calls first is not touched).
    """

    def __init__(self, compute: Callable[[torch.Tensor], list[Addition]], previous: Callable | None, batch: int,
                 rows: int, add: bool = True) -> None:
        self.compute, self.previous, self.batch, self.rows, self.add = compute, previous, batch, rows, add
        self.additions: list[Addition] | None = None

    def __call__(self, func: Callable, *args, **kwargs) -> torch.Tensor:
        out = self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)
        q = args[0] if args else kwargs.get("q")
        if (self.additions is not None or not kwargs.get("skip_reshape") or not isinstance(q, torch.Tensor)
                or q.ndim != 4 or q.shape[0] != self.batch or q.shape[2] < self.rows
                or not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[1] < self.rows):
            return out
        self.additions = self.compute(q)
        if self.add:
            out = out.clone() if out.requires_grad else out
            for off, delta, _, _ in self.additions:
                out[:, off:off + delta.shape[1]] += delta.to(out.dtype)
        return out


def add_to_outputs(out: dict, additions: list[Addition] | None) -> dict:
    """XLabs' injection point: the block's output streams, after its MLP."""
    out = dict(out)
    for _, delta, stream, off in additions or ():
        x = out[stream].clone() if out[stream].requires_grad else out[stream]
        x[:, off:off + delta.shape[1]] += delta.to(x.dtype)
        out[stream] = x
    return out


def geometry(transformer_options: dict, where: str) -> tuple[int, int, int]:
    """(latent h, latent w, text tokens) recorded by the diffusion-model wrapper for this call."""
    g = transformer_options.get(GEOMETRY_KEY)
    if g is None:
        raise RuntimeError(f"TroupeApplyFLUX: the {where} patch ran without its diffusion-model wrapper (latent size "
                           "unknown); run the model through ComfyUI's sampler or apply_model with the model's "
                           "transformer_options")
    return g


class BlockPatch:
    """patches_replace["dit"][(kind, i)]: DDS + Eq. 9 on one double or single block (wraps an earlier patch)."""

    def __init__(self, run: FluxInjection, kind: str, index: int, block: torch.nn.Module,
                 previous: Callable | None = None) -> None:
        self.run, self.kind, self.index, self.block, self.previous = run, kind, index, block, previous

    def __deepcopy__(self, memo: dict) -> "BlockPatch":
        import copy

        return type(self)(self.run, self.kind, self.index, self.block, copy.deepcopy(self.previous, memo))

    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        call = original if self.previous is None else (lambda a: self.previous(a, extra))
        to = args.get("transformer_options") or {}
        batch = args["img"].shape[0]
        lam = self.run.scales(to, batch)
        if lam is None:
            return call(args)
        lh, lw, n_txt = geometry(to, f"{self.kind} block")
        gh, gw = token_grid(lh, lw, self.run.patch_size)
        spans = self.spans(args, n_txt, gh * gw)
        compute = self.computation(args["pe"], lam, lh, lw, spans)
        residual = self.run.adapter.config.inject == RESIDUAL
        hook = AttentionHook(compute, to.get("optimized_attention_override"), batch,
                             max(off + n for off, n, *_ in spans), add=not residual)
        out = call(dict(args, transformer_options=dict(to, optimized_attention_override=hook)))
        return add_to_outputs(out, hook.additions) if residual else out

    def spans(self, args: dict, n_txt: int, n_img: int) -> list[tuple[int, int, str, int, int | None]]:
        """(joint offset, rows, output stream, stream offset, leading text rows of the mask or None for no mask)
        of every part of the block that receives the term."""
        both = self.run.params.dds == BOTH
        if self.kind == "double":
            flipped = getattr(self.block, "flipped_img_txt", False)
            txt_len, img_len = args["txt"].shape[1], args["img"].shape[1]
            img_off, txt_off = (0, img_len) if flipped else (txt_len, 0)
            parts = [(img_off, n_img, "img", 0, 0)]
            return parts + ([(txt_off, txt_len, "txt", 0, None)] if both else [])
        # single block: [text | image | reference latents]; both branches: text (M = 1) and image in one span
        return [(0, n_txt + n_img, "img", 0, n_txt)] if both else [(n_txt, n_img, "img", n_txt, 0)]

    def computation(self, pe, lam: torch.Tensor, lh: int, lw: int, spans) -> Callable[[torch.Tensor], list]:
        """The work done inside the block's attention call, on the block's own (RoPE-rotated) query."""
        def compute(q: torch.Tensor) -> list[Addition]:
            k, v = self.run.kv(self.kind, self.index, q.device, q.dtype, q.shape[-1])
            lam_device = self.run.on_device(lam, q.device, q.dtype)
            adds = []
            for off, n, stream, stream_off, text_rows in spans:
                masks = None if text_rows is None else self.run.masks(lh, lw, q.device, q.dtype, text_rows=text_rows)
                delta = masked_cross_attention(unrope(q, pe, off, n), k, v, lam, masks, lam_device)
                adds.append((off, delta, stream, stream_off))
            return adds

        return compute


# --------------------------------------------------------------------------- wrappers


class GeometryWrapper:
    """DIFFUSION_MODEL wrapper: records (latent h, latent w, text tokens) for the blocks of this call."""

    def __deepcopy__(self, memo: dict) -> "GeometryWrapper":
        return self

    def __call__(self, executor, x, timestep, context, *args, **kwargs):
        args = list(args)
        # positional order of Flux.forward: y, guidance, ref_latents, control, transformer_options
        if len(args) >= 5:
            to = dict(args[4] or {})
            to[GEOMETRY_KEY] = (int(x.shape[-2]), int(x.shape[-1]), int(context.shape[1]))
            args[4] = to
        else:
            to = dict(kwargs.get("transformer_options") or {})
            to[GEOMETRY_KEY] = (int(x.shape[-2]), int(x.shape[-1]), int(context.shape[1]))
            kwargs["transformer_options"] = to
        return executor(x, timestep, context, *args, **kwargs)


class ReleaseWrapper:
    """OUTER_SAMPLE wrapper: empties the run's cache when sampling ends, so nothing stays between runs."""

    def __init__(self, run: FluxInjection) -> None:
        self.run = run

    def __deepcopy__(self, memo: dict) -> "ReleaseWrapper":
        return self

    def __call__(self, executor, *args, **kwargs):
        self.run.release()
        try:
            return executor(*args, **kwargs)
        finally:
            self.run.release()


def check_model_fits(adapter: FluxImageAdapter, diffusion_model: torch.nn.Module) -> tuple[int, int]:
    """The (double, single) block counts to patch, after checking the adapter's layers and widths fit them."""
    blocks_d = getattr(diffusion_model, "double_blocks", None)
    blocks_s = getattr(diffusion_model, "single_blocks", None)
    if blocks_d is None or blocks_s is None:
        raise ValueError(f"not a FLUX-shaped model ({type(diffusion_model).__name__} has no double_blocks / "
                         "single_blocks); load a FLUX.1 dev or schnell model")
    nd, ns = len(blocks_d), len(blocks_s)
    c = adapter.config
    if c.double_only:
        ns = 0  # no layers for the single blocks: they stay as they are
    if c.double_blocks >= 0 and (c.double_blocks, c.single_blocks) != (nd, ns):
        raise ValueError(f"the adapter has {c.double_blocks} double + {c.single_blocks} single block layers but the "
                         f"model has {nd} + {ns}; use the adapter trained for this model")
    if adapter.num_layers != nd + ns:
        what = f"{nd} double blocks" if c.double_only else f"{nd} double + {ns} single = {nd + ns} blocks"
        raise ValueError(f"the adapter has {adapter.num_layers} block layers but the model has {what}; use the "
                         "adapter trained for this model")
    hidden = blocks_d[0].hidden_size if nd else blocks_s[0].hidden_size
    if c.hidden_size != hidden:
        raise ValueError(f"the adapter's width is {c.hidden_size} but the model's is {hidden}; use the adapter "
                         "trained for this model")
    heads = blocks_d[0].num_heads if nd else blocks_s[0].num_heads
    if c.head_dim and c.head_dim != hidden // heads:
        raise ValueError(f"the adapter's head width is {c.head_dim} but the model's is {hidden // heads}")
    return nd, ns

