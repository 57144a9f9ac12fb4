"""FLUX block-replacement patch: decoupled image cross-attention with DDS and mask-guided injection (004).

In every double and single block the patch adds, to the block's joint-attention output (before the block's
output projection, gate and MLP, as InstantX's FLUX IP-Adapter does; XLabs files: to the block's image output)
the term of Eq. 9 of 004 (``injection.py``), with Q_X the block's own query (after its QK RMSNorm, before
RoPE: taken from the block's attention call and rotated back, so nothing is projected twice), K_C / V_C the
adapter's projections of the subject's reference tokens, M_i subject i's layout region averaged over each 2x2
latent patch, and lambda_i = global weight x subject weight, zero outside [start, end] and for the uncond half
of real CFG. Dynamic Decoupling Strategy (Eqs. 4-5, Sec. 4.1): ``image branch only`` (the inference rule)
adds the term to the image tokens only; ``both branches`` also to the text tokens (Eq. 5, M = 1).

``FluxInjection`` is the patch object ``nodes/lifecycle.py`` installs: ``dit_block`` for every block,
``diffusion_model`` (records the latent size and text length of each call). It holds no per-run state: the
K/V, masks and lambdas computed once per run go in the ``run`` dict the host hands in. Plain torch (it reads
the block's ``num_heads`` and hooks ComfyUI's ``optimized_attention_override``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..attention_record import RUN_KEY, subject_mass
from ..layout.grid import token_grid
from ..layout.layout import Layout
from ..setup_progress import setup_done
from .adapter import RESIDUAL, FluxImageAdapter
from .injection import (
    BOTH,
    SINGLE_STREAM,
    AttentionFn,
    InjectionParams,
    TokenMasks,
    masked_cross_attention,
    sdpa_attention,
    token_masks,
    unrope,
)

GEOMETRY_KEY = "troupe_flux_geometry"
# (offset in the joint attention output, delta [B, n, D], stream of the block's output, offset in that stream)
Addition = tuple[int, torch.Tensor, str, int]
# (joint offset, rows, output stream, stream offset, leading text rows of the mask or None for no mask)
Span = tuple[int, int, str, int, "int | None"]


# --------------------------------------------------------------------------- attention hook


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
            grad = out.requires_grad or any(d.requires_grad for _, d, _, _ in self.additions)
            out = out.clone() if grad else out  # training: never modify a tensor autograd may have saved
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


# --------------------------------------------------------------------------- the patch


class FluxInjection:
    """Everything one TroupeApplyFLUX output needs: adapter, reference tokens C_i, params, layout (read-only).

    The per-run values (K/V per block, masks per latent size, lambdas per forward) go in ``run``, a dict the
    host gives each call and empties when the sampling run ends.
    """

    def __init__(self, adapter: FluxImageAdapter, tokens: torch.Tensor, params: InjectionParams,
                 layout: Layout | None, model_double_blocks: int, patch_size: int = 2, *,
                 flipped_img_txt: bool = False, attention: AttentionFn = sdpa_attention,
                 trainable: bool = False) -> None:
        self.adapter = adapter
        # C_i [N, T, C], computed once at apply time; ``trainable`` (the training toolkit) keeps the tokens' graph,
        # so the projection, the fusion before it and every block's K/V get their gradient (same numbers)
        self.trainable = trainable
        self.tokens = tokens.float() if trainable else tokens.detach().float().cpu()
        self.params = params
        self.layout = layout
        self.model_double_blocks = model_double_blocks
        self.patch_size = patch_size
        self.flipped_img_txt = flipped_img_txt  # double blocks with [image | text] order
        self.attention = attention
        n = tokens.shape[0]
        sw = params.subject_weights or (1.0,) * n
        if len(sw) != n:
            raise ValueError(f"{len(sw)} subject weights for {n} subjects")
        self.lambdas = torch.tensor([params.weight * w for w in sw], dtype=torch.float32)  # lambda_i

    @property
    def num_subjects(self) -> int:
        return int(self.tokens.shape[0])

    # ---------------------------------------------------------------- once per run

    def kv(self, run: dict, kind: str, index: int, device, dtype, head_dim: int) -> tuple[list, list]:
        """K_C, V_C [H, T, d] of every subject for one block, computed once per run on the model's device."""
        key = ("kv", kind, index, str(device), dtype)
        if key not in run:
            c = self.adapter.config
            layer = self.adapter.layer(kind, index, self.model_double_blocks)
            k, v = layer.kv(self.tokens, head_dim, norm_v=c.norm_v, eps=c.norm_eps, norm_k=c.norm_k, device=device,
                            dtype=dtype)
            run[key] = (list(k.unbind(0)), list(v.unbind(0)))
            setup_done(run, (f"{kind}_block", index))  # this block's once-per-run setup (the host's progress bar)
        return run[key]

    def masks(self, run: dict, latent_h: int, latent_w: int, device, dtype, text_rows: int = 0) -> TokenMasks | None:
        """M_i on [text rows (all 1, ``both branches``) | image tokens h' * w'] for this latent size, once per
        run (None without a layout: every subject everywhere)."""
        if self.layout is None:
            return None
        key = ("mask", latent_h, latent_w, text_rows, str(device), dtype)
        if key not in run:
            m = token_masks(self.layout, latent_h, latent_w, self.patch_size)
            if text_rows:
                m = torch.cat([m.new_ones(m.shape[0], text_rows), m], dim=1)
            run[key] = TokenMasks.of(m.to(device=device, dtype=dtype))
        return run[key]

    # ---------------------------------------------------------------- once per forward

    def scales(self, run: dict, transformer_options: dict, batch: int) -> torch.Tensor | None:
        """lambda [B, N] for this call: zero outside the sigma window and for uncond rows; None when all zero."""
        if not bool(self.lambdas.any()):
            return None
        sigmas = transformer_options.get("sigmas")
        chunks = transformer_options.get("cond_or_uncond")
        key = (tuple(chunks or ()), batch)
        last = run.get("lam")
        if last is not None and last[0] is sigmas and last[1] == key:
            return last[2]  # the same call: the blocks of one forward share it (no device sync per block)
        lam = self._scales(sigmas, chunks, batch)
        run["lam"] = (sigmas, key, lam)
        return lam

    def on_device(self, run: dict, lam: torch.Tensor, device, dtype) -> torch.Tensor:
        """lambda on the model's device, copied once per forward (the blocks share it)."""
        last = run.get("lam_device")
        if last is None or last[0] is not lam or last[1] != (str(device), dtype):
            last = (lam, (str(device), dtype), lam.to(device=device, dtype=dtype))
            run["lam_device"] = last
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

    # ---------------------------------------------------------------- host hooks

    def dit_block(self, block: tuple[str, int], args: dict, extra: dict, run: dict,
                  previous: Callable | None = None) -> dict:
        """``patches_replace["dit"][block]``: DDS + Eq. 9 on one double or single block (inside an earlier patch)."""
        kind, index = block[0].removesuffix("_block"), int(block[1])
        original = extra["original_block"]
        call = original if previous is None else (lambda a: previous(a, extra))
        to = args.get("transformer_options") or {}
        batch = args["img"].shape[0]
        lam = self.scales(run, to, batch)
        if lam is None:
            return call(args)
        lh, lw, n_txt = geometry(to, f"{kind} block")
        gh, gw = token_grid(lh, lw, self.patch_size)
        spans = self.spans(kind, args, n_txt, gh * gw)
        compute = self.computation(run, kind, index, args["pe"], lam, lh, lw, spans)
        residual = self.adapter.config.inject == RESIDUAL
        hook = AttentionHook(compute, to.get("optimized_attention_override"), batch,
                             max(off + n for off, n, *_ in spans), add=not residual)
        out = call(dict(args, transformer_options=dict(to, optimized_attention_override=hook)))
        return add_to_outputs(out, hook.additions) if residual else out

    def diffusion_model(self, executor, x, timestep, context, *args, **kwargs):
        """DIFFUSION_MODEL wrapper: records (latent h, latent w, text tokens) for the blocks of this call."""
        args = list(args)
        geo = (int(x.shape[-2]), int(x.shape[-1]), int(context.shape[1]))
        if len(args) >= 5:  # positional order of Flux.forward: y, guidance, ref_latents, control, transformer_options
            args[4] = {**(args[4] or {}), GEOMETRY_KEY: geo}
        else:
            kwargs["transformer_options"] = {**(kwargs.get("transformer_options") or {}), GEOMETRY_KEY: geo}
        return executor(x, timestep, context, *args, **kwargs)

    def spans(self, kind: str, args: dict, n_txt: int, n_img: int) -> list[Span]:
        """Every part of the block that receives the term (see ``Span``)."""
        both = self.params.dds == BOTH
        whole_single = both or self.params.dds == SINGLE_STREAM
        if kind == "double":
            txt_len, img_len = args["txt"].shape[1], args["img"].shape[1]
            img_off, txt_off = (0, img_len) if self.flipped_img_txt else (txt_len, 0)
            parts = [(img_off, n_img, "img", 0, 0)]
            return parts + ([(txt_off, txt_len, "txt", 0, None)] if both else [])
        # single block: [text | image | reference latents]; both branches and InstantX: text (M = 1) and image
        return [(0, n_txt + n_img, "img", 0, n_txt)] if whole_single else [(n_txt, n_img, "img", n_txt, 0)]

    def computation(self, run: dict, kind: str, index: int, pe, lam: torch.Tensor, lh: int, lw: int,
                    spans: list[Span]) -> Callable[[torch.Tensor], list[Addition]]:
        """The work done inside the block's attention call, on the block's own (RoPE-rotated) query."""
        def compute(q: torch.Tensor) -> list[Addition]:
            k, v = self.kv(run, kind, index, q.device, q.dtype, q.shape[-1])
            lam_device = self.on_device(run, lam, q.device, q.dtype)
            adds = []
            for off, n, stream, stream_off, text_rows in spans:
                masks = None if text_rows is None else self.masks(run, lh, lw, q.device, q.dtype, text_rows=text_rows)
                delta = masked_cross_attention(unrope(q, pe, off, n), k, v, lam, masks, lam_device, self.attention)
                adds.append((off, delta, stream, stream_off))
                if text_rows is not None:
                    self.record(run, kind, q, pe, k, lam, lh, lw, off + text_rows)
            return adds

        return compute


    def record(self, run: dict, kind: str, q: torch.Tensor, pe, keys: list, lam: torch.Tensor, lh: int, lw: int,
               start: int) -> None:
        """Per-subject attention mass of Eq. 9 (CA_i's softmax times M_i) on the image tokens of the rows with
        subject features (cond rows in the window) to the run's recorder (``attention_record``)."""
        recorder, sigma = run.get(RUN_KEY), run.get("lam", (None,))[0]
        sigma = float("inf") if sigma is None else float(sigma.flatten()[0])
        if recorder is None or not recorder.wants(kind, sigma):
            return
        rows = torch.nonzero(lam.any(1)).flatten()
        gh, gw = token_grid(lh, lw, self.patch_size)
        qi = unrope(q, pe, start, gh * gw).index_select(0, rows.to(q.device))
        masks = self.masks(run, lh, lw, q.device, q.dtype)
        buf = recorder.begin((gh, gw), len(rows), self.num_subjects, q.device)
        for i, k in enumerate(keys):
            if not bool(lam[rows, i].any()):
                continue
            pix = None if masks is None else masks.rows[i]
            if pix is not None and pix.numel() == 0:
                continue
            mass = subject_mass(qi if pix is None else qi[:, :, pix], k, torch.zeros(k.shape[1]), 1)
            if masks is not None:
                m = masks.values[i] if pix is None else masks.values[i].index_select(0, pix)
                mass = mass * m.float()[None, :, None]
            recorder.add(buf, mass, pix, torch.tensor([i]))


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

