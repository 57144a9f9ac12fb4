"""Regional decoupled cross-attention for SDXL: one attn2 replace patch for any number of subjects.

Two exact semantics, picked by the adapter file (``adapter.semantics``):

- ``joint`` (MS-Diffusion and R^3 files): one softmax per pixel over the 4 dummy tokens and every
  subject's gated tokens; subject j's tokens get a -10000 bias outside region j, the dummy tokens
  get it wherever some region covers the pixel, pixels no region covers get zero image attention,
  and ``out = text_out + scale * ip_out`` with per-subject scales on the attention probabilities.
  Since ``(P * s) @ V = P @ (s * V)``, the per-token scales are folded into the values. The -10000 bias
  makes masked probabilities exactly 0 (``exp`` underflows), so the patch computes the same numbers
  without a mask: each group of pixels covered by the same regions attends only to those regions'
  tokens, the background to nothing (``joint_groups``); the dummy tokens then never contribute.
- ``separate`` (IP-Adapter files): ``out = text_out + sum_i lambda_i * M_i * Attn(Q, K_i, V_i)``, each
  term computed only where ``M_i > 0``.

Routing (Eq. 6 of 000): the gated tokens are ``Concat_l(w_l(t) * T_l)``; ``to_k_ip``/``to_v_ip``
have no bias, so ``K(w T) = w K(T)`` and the per-step gate only rescales projections cached once
per sampling run.

Plain torch: the host passes its attention function (``attention(q, k, v, heads, mask=None)`` like
ComfyUI's ``optimized_attention``, so the user's attention backend runs the image term too) and a
``sigma -> t in [0, 1]`` converter. The patch holds no per-run state: everything a run computes once goes in
the ``run`` dict the host hands in (``nodes/lifecycle.py``), so clones may share the patch.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..attention_record import RUN_KEY, subject_mass
from ..layout.grid import grid_of_tokens
from ..layout.layout import Layout
from ..setup_progress import setup_done
from .layer_weights import layer_weight, parse_layer_weights
from .router import MODES

LayerKey = tuple[str, int, int]
AttentionFn = Callable[..., torch.Tensor]

# "all": every cross-attention layer the file has weights for, as MS-Diffusion and IP-Adapter were trained;
# "down+mid" is where 000 applies its alignment loss (Sec. 3.4.2), not where it injects subject tokens
BLOCK_CHOICES: tuple[str, ...] = ("all", "down+mid", "down", "mid", "up", "down+up")
# how per-subject weights combine with the global weight: MS-Diffusion's processor drops the global scale when
# per-subject scales are given (MaskedIPAttnProcessor2_0); "as trained" does that for MS-Diffusion files
AS_TRAINED, TIMES_WEIGHT, INSTEAD_OF_WEIGHT = "as trained", "times weight", "instead of weight (MS-Diffusion)"
SUBJECT_SCALES: tuple[str, ...] = (AS_TRAINED, TIMES_WEIGHT, INSTEAD_OF_WEIGHT)
SEMANTICS: tuple[str, ...] = ("joint", "separate")


# --------------------------------------------------------------------------- pure math


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on [B, N, heads*d] tensors, additive mask [N, L]: the plain-torch default (tests)."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c)


def block_selected(key: LayerKey, blocks: str) -> bool:
    """Which UNet part a layer belongs to: input = down, middle = mid, output = up."""
    part = {"input": "down", "middle": "mid", "output": "up"}[key[0]]
    if blocks == "all":
        return True
    if blocks not in BLOCK_CHOICES:
        raise ValueError(f"blocks must be one of {BLOCK_CHOICES}, got {blocks!r}")
    return part in blocks.split("+")


def joint_groups(region_masks: torch.Tensor, tokens_per_subject: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The joint attention split exactly by coverage: (pixels, subject-token indices) per set of covering regions.

    With MS-Diffusion's bias (-10000 on subject j's tokens outside region j, and on the dummy tokens wherever a
    region covers the pixel) a covered pixel's softmax gives the masked tokens ``exp(-10000 + ...)``,
    which is exactly 0 in fp16/fp32, and the background's output is zeroed; so each group of pixels covered by
    the same regions attends, unmasked, to those regions' tokens only, and the background to nothing.
    """
    on = region_masks > 0.5
    n = on.shape[0]
    codes = (on.long() * (2 ** torch.arange(n))[:, None]).sum(0)  # [P] bit j = region j covers the pixel
    groups = []
    for code in torch.unique(codes).tolist():
        if code == 0:
            continue
        pixels = torch.nonzero(codes == code).flatten()
        tokens = torch.cat([torch.arange(j * tokens_per_subject, (j + 1) * tokens_per_subject)
                            for j in range(n) if code >> j & 1])
        groups.append((pixels, tokens))
    return groups


def level_gates(num_levels: int, tokens_per_level: int, gates: torch.Tensor) -> torch.Tensor:
    """Per-token gate [num_levels * T] of one subject's concatenated levels (Eq. 6 of 000)."""
    if gates.numel() != num_levels:
        raise ValueError(f"the router gave {gates.numel()} gates for {num_levels} token levels")
    return gates.float().repeat_interleave(tokens_per_level)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class RegionalParams:
    """What TroupeApplySDXL sets: global and per-subject scales, active sigma range, blocks, routing."""

    weight: float = 1.0
    subject_weights: tuple[float, ...] = ()
    sigma_start: float = math.inf  # the patch acts while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    blocks: str = "all"
    routing: str = "learned"
    schedule: str | None = None
    refine: bool = True
    layer_weights: str = ""  # IPAdapter_plus' "index:weight, ..." per transformer module (layer_weights.py)
    subject_scale: str = AS_TRAINED

    def __post_init__(self) -> None:
        if self.blocks not in BLOCK_CHOICES:
            raise ValueError(f"blocks must be one of {BLOCK_CHOICES}, got {self.blocks!r}")
        if self.subject_scale not in SUBJECT_SCALES:
            raise ValueError(f"subject weights must be one of {SUBJECT_SCALES}, got {self.subject_scale!r}")
        parse_layer_weights(self.layer_weights)  # a malformed string fails here, not mid-sampling
        if self.routing not in MODES:
            raise ValueError(f"routing must be one of {MODES}, got {self.routing!r}")


def subject_scale_rule(adapter: Any, params: RegionalParams) -> str:
    """``times weight`` or ``instead of weight (MS-Diffusion)``: what ``as trained`` means for this file."""
    if params.subject_scale != AS_TRAINED:
        return params.subject_scale
    return INSTEAD_OF_WEIGHT if getattr(adapter, "format", "") == "ms-diffusion" else TIMES_WEIGHT


def subject_scales(adapter: Any, params: RegionalParams, n: int) -> torch.Tensor:
    """The scale of each subject's image term [N]: its weight times the global weight, or (MS-Diffusion, when
    subject weights are given) its weight alone, as MaskedIPAttnProcessor2_0 does."""
    given = tuple(params.subject_weights)
    s = torch.tensor(given or (1.0,) * n, dtype=torch.float32)
    if given and subject_scale_rule(adapter, params) == INSTEAD_OF_WEIGHT:
        return s
    return s * float(params.weight)


def route_gates(adapter: Any, t: float, params: RegionalParams) -> torch.Tensor:
    """The adapter's level gates [L] at t; with refinement off, the base level's gate (a manual schedule's w0)."""
    kw = {} if params.refine else {"refine": False}
    g = adapter.route(t, mode=params.routing, schedule=params.schedule, **kw)
    return torch.as_tensor(g, dtype=torch.float32).flatten()


# --------------------------------------------------------------------------- the patch


class RegionalAttentionPatch:
    """The attn2 replace of every patched layer: text attention plus the regional image attention.

    ``tokens`` [N, L, T, D] are the subjects' refined levels (cond branch); ``uncond_tokens`` the same for
    the uncond branch of ``separate`` files (IP-Adapter feeds projected zero features there) or None.
    Everything step-independent (K/V per layer and level, masks per grid) is built lazily on the first call
    of a run, keyed on device and dtype, in the ``run`` dict the host gives each call (one per sampling run);
    the patch itself never changes after construction.
    """

    def __init__(self, adapter: Any, tokens: torch.Tensor, layout: Layout, params: RegionalParams, *,
                 uncond_tokens: torch.Tensor | None = None, attention: AttentionFn = sdpa_attention,
                 sigma_to_t: Callable[[float], float] | None = None, trainable: bool = False) -> None:
        if adapter.semantics not in SEMANTICS:
            raise ValueError(f"adapter semantics must be one of {SEMANTICS}, got {adapter.semantics!r}")
        if tokens.ndim != 4:
            raise ValueError(f"subject tokens must be [N, levels, T, D], got {tuple(tokens.shape)}")
        n = tokens.shape[0]
        if n != len(layout):
            raise ValueError(f"{n} subjects but the layout has {len(layout)} regions")
        if not params.refine:
            tokens = tokens[:, :1]
            uncond_tokens = None if uncond_tokens is None else uncond_tokens[:, :1]
        self.adapter = adapter
        self.semantics = adapter.semantics
        # trainable (the training toolkit): tokens, K/V weights and the learned router keep their autograd graph
        self.trainable = bool(trainable)
        keep = (lambda x: x) if self.trainable else (lambda x: x.detach())
        self.tokens = keep(tokens)
        self.uncond_tokens = None if uncond_tokens is None else keep(uncond_tokens)
        self.layout = layout
        self.params = params
        self.subject_weights = tuple(params.subject_weights) or (1.0,) * n
        if len(self.subject_weights) != n:
            raise ValueError(f"{len(self.subject_weights)} subject weights for {n} subjects")
        self.attention = attention
        self.sigma_to_t = sigma_to_t
        self.layer_weights = parse_layer_weights(params.layer_weights)
        self.scales = subject_scales(adapter, params, n)
        if self.semantics == "joint" and adapter.dummy_tokens is None:
            raise ValueError("a joint-attention adapter needs dummy tokens (MS-Diffusion's dummy_image_tokens)")

    @property
    def num_subjects(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_levels(self) -> int:
        return int(self.tokens.shape[1])

    # ---------------------------------------------------------------- step-dependent gates

    def gates(self, sigma: float, run: dict | None = None) -> torch.Tensor:
        """The level gates [L] at this step: learned (Eqs. 5-6 of 000), static, or a manual schedule."""
        if self.num_levels == 1 and self.params.routing != "manual":
            return torch.ones(1)
        run = {} if run is None else run
        key = ("gates", sigma)
        if key not in run:
            t = 1.0 if self.sigma_to_t is None else float(self.sigma_to_t(sigma))
            t = min(max(t, 0.0), 1.0)
            learned = self.params.routing == "learned" and self.num_levels > 1
            if self.trainable and learned:  # Eq. 5 of 000 with its gradient: the router trains end to end
                run[key] = self.adapter.router(t).float().flatten()[: self.num_levels]
            else:
                run[key] = route_gates(self.adapter, t, self.params)[: self.num_levels]
        return run[key]

    # ---------------------------------------------------------------- per-run cache

    def projections(self, run: dict, key: LayerKey, device, dtype) -> dict[str, torch.Tensor]:
        """K/V of all subjects' levels at one layer (once per run)."""
        ck = ("kv", key, device, dtype)
        if ck not in run:
            to_k, to_v = self.adapter.kv(key)
            wk, wv = to_k.weight, to_v.weight
            if not self.trainable:
                wk, wv = wk.detach(), wv.detach()
            wk = wk.to(device=device, dtype=torch.float32)
            wv = wv.to(device=device, dtype=torch.float32)

            def proj(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                x = x.to(device=device, dtype=torch.float32)
                return F.linear(x, wk).to(dtype), F.linear(x, wv).to(dtype)

            n, levels, t, d = self.tokens.shape
            entry = {}
            entry["k"], entry["v"] = proj(self.tokens.reshape(n, levels * t, d))  # [N, L*T, C]
            if self.uncond_tokens is not None:
                entry["uk"], entry["uv"] = proj(self.uncond_tokens.reshape(n, levels * t, d))
            run[ck] = entry
            setup_done(run, key)  # this layer's once-per-run setup (the host's progress bar)
        return run[ck]

    def masks(self, run: dict, h: int, w: int, device) -> dict[str, Any]:
        """Region masks at one token grid (once per run and resolution)."""
        ck = ("mask", h, w, device)
        if ck not in run:
            p = h * w
            if self.semantics == "joint":
                grid = self.layout.masks(h, w, edge="binary").flatten(1)  # floor start / ceil end
                t = self.num_levels * self.tokens.shape[2]
                groups = [(None if len(pix) == p else pix.to(device), tok.to(device))
                          for pix, tok in joint_groups(grid, t)]
                entry = {"groups": groups}
            else:
                grid = self.layout.masks(h, w, edge="coverage").flatten(1)
                support = []
                for m in grid:  # each subject attends only where its mask is non-zero (the rest adds 0)
                    pix = torch.nonzero(m > 0).flatten()
                    support.append((None if len(pix) == p else pix.to(device), m[pix].to(device)[:, None]))
                entry = {"support": support}
            run[ck] = entry
        return run[ck]

    def token_scales(self, run: dict, sigma: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token key scale [N, L*T] (level gates) and value scale (gates * global * subject weight)."""
        ck = ("scales", sigma, device, dtype)
        if ck not in run:
            g = level_gates(self.num_levels, self.tokens.shape[2], self.gates(sigma, run))
            ks = g[None].expand(self.num_subjects, -1)
            vs = ks * self.scales[:, None]
            run[ck] = (ks.to(device=device, dtype=dtype), vs.to(device=device, dtype=dtype))
        return run[ck]

    # ---------------------------------------------------------------- the attention

    @staticmethod
    def step_sigma(run: dict, sigmas: torch.Tensor | None) -> float:
        """The step's sigma as a float, read once per UNet forward: every attention call of one forward gets
        the same tensor, and reading a GPU tensor's value synchronises the device."""
        if sigmas is None:
            return math.inf
        last = run.get("sigma")
        if last is None or last[0] is not sigmas:
            last = (sigmas, float(sigmas.flatten()[0]))
            run["sigma"] = last
        return last[1]

    def active(self, sigma: float) -> bool:
        return self.params.sigma_end <= sigma <= self.params.sigma_start

    def attn2(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
              run: dict | None = None, previous: Callable | None = None) -> torch.Tensor:
        """The attn2 replacement: ``previous`` (an earlier attn2 replace) or plain attention gives the text term."""
        run = {} if run is None else run
        heads = extra_options["n_heads"]
        block = extra_options["block"]
        key = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
        out = previous(q, k, v, extra_options) if previous is not None else self.attention(q, k, v, heads)
        sigmas = extra_options.get("sigmas")
        sigma = self.step_sigma(run, sigmas)
        if sigmas is not None and not self.active(sigma):
            return out
        factor = layer_weight(self.layer_weights, key)
        if factor == 0.0:
            setup_done(run, key)  # nothing to set up here; counted so the host's setup progress completes
            return out  # a module left out of layer_weights gets no image term (as IPAdapter_plus)
        shape = extra_options["original_shape"]
        h, w = grid_of_tokens(q.shape[1], int(shape[-2]), int(shape[-1]))
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        size = q.shape[0] // len(chunks)
        for c, kind in enumerate(chunks):
            rows = slice(c * size, (c + 1) * size)
            if kind == 0:
                out[rows] = out[rows] + factor * self.image_attention(q[rows], key, h, w, sigma, heads, run=run)
                self.record(run, q[rows], key, h, w, sigma, heads)
            elif self.uncond_tokens is not None:
                out[rows] = out[rows] + factor * self.image_attention(q[rows], key, h, w, sigma, heads, uncond=True,
                                                                      run=run)
            # joint semantics: the uncond branch has zero boxes, so every pixel is background (zero image attention)
        return out

    def image_attention(self, q: torch.Tensor, key: LayerKey, h: int, w: int, sigma: float, heads: int,
                        uncond: bool = False, run: dict | None = None) -> torch.Tensor:
        """The image term added to the text attention for rows q [B, P, C] of one branch."""
        run = {} if run is None else run
        b = q.shape[0]
        kv = self.projections(run, key, q.device, q.dtype)
        masks = self.masks(run, h, w, q.device)
        ks, vs = self.token_scales(run, sigma, q.device, q.dtype)
        kk, vv = (kv["uk"], kv["uv"]) if uncond else (kv["k"], kv["v"])
        kk = kk * ks[..., None]  # [N, L*T, C]: gated keys (Eq. 6 of 000)
        vv = vv * vs[..., None]  # gated values times global and subject scales
        out = torch.zeros_like(q)
        if self.semantics == "joint":
            kk, vv = kk.flatten(0, 1), vv.flatten(0, 1)
            for pix, tok in masks["groups"]:
                qg = q if pix is None else q[:, pix]
                ip = self.attention(qg, kk[tok][None].expand(b, -1, -1), vv[tok][None].expand(b, -1, -1), heads)
                if pix is None:
                    out = ip
                else:
                    out[:, pix] = ip
            return out
        for i, (pix, m) in enumerate(masks["support"]):
            if m.numel() == 0:
                continue
            qg = q if pix is None else q[:, pix]
            ip = self.attention(qg, kk[i][None].expand(b, -1, -1), vv[i][None].expand(b, -1, -1), heads) * m.to(q.dtype)
            if pix is None:
                out = out + ip
            else:
                out[:, pix] += ip
        return out


    def record(self, run: dict, q: torch.Tensor, key: LayerKey, h: int, w: int, sigma: float, heads: int) -> None:
        """Per-subject attention mass of the cond rows' image term to the run's recorder (``attention_record``)."""
        recorder = run.get(RUN_KEY)
        if recorder is None or not recorder.wants({"input": "down", "middle": "mid", "output": "up"}[key[0]], sigma):
            return
        b, p, c = q.shape
        qh = q.reshape(b, p, heads, c // heads).transpose(1, 2)  # [B, H, P, d]
        kk = self.projections(run, key, q.device, q.dtype)["k"] * self.token_scales(run, sigma, q.device, q.dtype)[0][
            ..., None]  # the gated keys of image_attention
        buf = recorder.begin((h, w), b, self.num_subjects, q.device)
        if self.semantics == "joint":  # one softmax per group of pixels over its regions' tokens
            per = kk.shape[1]
            kk = kk.flatten(0, 1)
            for pix, tok in self.masks(run, h, w, q.device)["groups"]:
                keys = kk[tok].reshape(len(tok), heads, -1).transpose(0, 1)
                subjects = tok // per
                order = torch.unique(subjects)
                mass = subject_mass(qh if pix is None else qh[:, :, pix], keys, torch.searchsorted(order, subjects),
                                    len(order))
                recorder.add(buf, mass, pix, order)
            return
        for i, (pix, m) in enumerate(self.masks(run, h, w, q.device)["support"]):  # subject i's softmax, times M_i
            if m.numel() == 0:
                continue
            keys = kk[i].reshape(kk.shape[1], heads, -1).transpose(0, 1)
            mass = subject_mass(qh if pix is None else qh[:, :, pix], keys, torch.zeros(keys.shape[1]), 1)
            recorder.add(buf, mass * m.float()[None], pix, torch.tensor([i]))


def layer_keys_for(adapter: Any, blocks: str) -> list[LayerKey]:
    """The adapter's layer locations in the chosen blocks."""
    return [k for k in adapter.layer_keys() if block_selected(k, blocks)]


def check_widths(adapter: Any, widths: dict[LayerKey, tuple[int, int]], keys: Sequence[LayerKey]) -> None:
    """Every patched layer exists in the model with the adapter's widths; ``widths[key] = (context, inner)``."""
    missing = [k for k in keys if k not in widths]
    if missing:
        raise ValueError(f"the adapter has weights for cross-attention layers the model lacks: {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''} (an adapter for another UNet?)")
    for k in keys:
        to_k, _ = adapter.kv(k)
        context, inner = widths[k]
        if to_k.weight.shape[1] != context or to_k.weight.shape[0] != inner:
            raise ValueError(f"layer {k}: the adapter's to_k_ip maps {to_k.weight.shape[1]} -> {to_k.weight.shape[0]}"
                             f" but the model's attention takes context {context} and has width {inner}"
                             " (an adapter for another base model?)")
