"""SDXL adapter training: the base model's diffusion loss, R^3-Adapter's REPA and MultiPersona-Align's dual alignment.

Plain torch. The frozen UNet is ComfyUI's (any SDXL checkpoint ComfyUI loads); the adapter is ``SdxlAdapter`` and its
image term is ``RegionalAttentionPatch``, the very patch the nodes install, built ``trainable`` so that the tokens,
the per-layer K/V and the learned router keep their gradient.

Methods (``METHODS``):

- ``ms-diffusion``: the adapter alone (grounding resampler, K/V per layer), diffusion loss only.
- ``r3`` (R^3-Adapter, Secs. 3.2-3.4 and A.1): plus the progressive refiner (Eqs. 1-4) and the RBF router (Eqs. 5-6)
  trained end to end, and REPA (Eqs. 7-11) through a frozen orthogonal projection ``W2 W1`` (Eq. 7).
- ``multipersona`` (MultiPersona-Align, Secs. 3.3.1-3.3.4): the MS-Diffusion adapter plus dual alignment (Eqs. 5-6)
  through trainable projectors ``Linear, LayerNorm, Dropout, GELU, Linear`` (Eq. 7), total loss Eq. 8.

Alignment features (both papers align "down blocks and the mid block", R^3-Adapter A.2 / MultiPersona-Align 4.5):

- cross-attention: the adapter's image-attention output (the term the adapter adds to the text attention, before
  ``to_out``) inside subject j's box, mean-pooled, against DINO's CLS token of the target cropped at box j
  (Eq. 8 of R^3-Adapter, Eq. 5 of MultiPersona-Align);
- self-attention: the self-attention output (after ``to_out``) of every pixel, mean-pooled, against the mean of the
  target image's DINO patch tokens (Eq. 9 / Eq. 6).

"down" is the lowest-resolution down level (ComfyUI's input blocks 7 and 8, "the layers closest to the latent
bottleneck", Sec. 3.4.2 of R^3-Adapter), "mid" the middle block; the loss is averaged over their transformer layers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layout.grid import grid_of_tokens
from ..models.layout.layout import Layout
from ..models.sdxl.adapter import SdxlAdapter
from ..models.sdxl.patch import RegionalAttentionPatch, RegionalParams, sdpa_attention

METHODS = ("r3", "ms-diffusion", "multipersona")
ALIGN_MODULES: dict[str, tuple[tuple[str, int], ...]] = {"down": (("input", 7), ("input", 8)), "mid": (("middle", 0),)}
NUM_TIMESTEPS = 1000


def align_modules(blocks: str) -> set[tuple[str, int]]:
    """The (block, id) modules aligned for ``blocks`` in {"down+mid", "down", "mid"}."""
    out: set[tuple[str, int]] = set()
    for part in blocks.split("+"):
        if part not in ALIGN_MODULES:
            raise ValueError(f"alignment blocks must be down, mid or down+mid, got {blocks!r}")
        out.update(ALIGN_MODULES[part])
    return out


# --------------------------------------------------------------------------- projections


def orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A [rows, cols] matrix with orthonormal rows (rows <= cols) or orthonormal columns (rows > cols)."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None]  # the unique QR: a Haar-distributed orthogonal factor
    return (q if rows >= cols else q.T).float().contiguous()


class OrthogonalProjection(nn.Module):
    """Eq. 7 of R^3-Adapter: ``P_frozen = W2 W1``, W1 [hidden, d_dino], W2 [D, hidden], orthogonal and frozen.

    Buffers, not parameters: no gradient can reach them ("forcing the UNet to adapt its representations rather
    than the projection network learning trivial shortcuts", Sec. 3.4.1). One W2 per feature width D of the
    aligned layers; the same P serves Eqs. 8 and 9.
    """

    def __init__(self, in_dim: int, widths: Sequence[int], hidden: int = 512, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("w1", orthogonal(hidden, in_dim, gen))
        for w in sorted({int(x) for x in widths}):
            self.register_buffer(f"w2_{w}", orthogonal(w, hidden, gen))

    def matrices(self) -> list[torch.Tensor]:
        return [b for _, b in self.named_buffers()]

    def forward(self, f: torch.Tensor, width: int, kind: str = "cross") -> torch.Tensor:
        return f.float() @ self.w1.T @ getattr(self, f"w2_{int(width)}").T


class Projector(nn.Sequential):
    """Eq. 7 of MultiPersona-Align: Pi(f) = Linear_2(GELU(Dropout(LayerNorm(Linear_1(f)))))."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.1):
        super().__init__(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.Dropout(dropout), nn.GELU(),
                         nn.Linear(hidden, out_dim))


class TrainableProjection(nn.Module):
    """MultiPersona-Align's projectors: Pi_cross (Eq. 5) and Pi_self (Eq. 6), one pair per aligned feature width.

    They map DINO features to the width of the diffusion features they are compared with, as Eqs. 5-6 write them
    (Pi applied to the DINO side); Sec. 3.3.3 calls them trainable.
    """

    def __init__(self, in_dim: int, widths: Sequence[int], hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        self.heads = nn.ModuleDict()
        for w in sorted({int(x) for x in widths}):
            self.heads[f"cross_{w}"] = Projector(in_dim, hidden, w, dropout)
            self.heads[f"self_{w}"] = Projector(in_dim, hidden, w, dropout)

    def forward(self, f: torch.Tensor, width: int, kind: str = "cross") -> torch.Tensor:
        return self.heads[f"{kind}_{int(width)}"](f.float())


def cosine_loss(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(h, target) along the last axis (Eqs. 8-9 of R^3-Adapter, Eqs. 5-6 of MultiPersona-Align)."""
    return 1.0 - F.cosine_similarity(h.float(), target.float(), dim=-1, eps=1e-6)


# --------------------------------------------------------------------------- schedules


def phase_schedule(step: int, method: str, phase1_steps: int, ramp_steps: int, align_weight: float) -> tuple[float, float]:
    """(refiner alpha, alignment weight lambda) at optimiser step ``step`` (0-based).

    R^3-Adapter A.1: phase 1 (``phase1_steps``) has alpha = 0 and lambda = 0; phase 2 raises alpha linearly from 0
    to 1 over ``ramp_steps`` and sets lambda = ``align_weight`` (0.01). MultiPersona-Align 4.1: lambda = 0 for the
    first phase, then 0.01 (no refiner). ms-diffusion: no refiner, no alignment.
    """
    in_phase2 = step >= phase1_steps
    if method == "r3":
        alpha = 0.0 if not in_phase2 else (1.0 if ramp_steps <= 0 else min(1.0, (step - phase1_steps + 1) / ramp_steps))
        return alpha, (align_weight if in_phase2 else 0.0)
    if method == "multipersona":
        return 0.0, (align_weight if in_phase2 else 0.0)
    return 0.0, 0.0


# --------------------------------------------------------------------------- one batch


@dataclass
class Sample:
    """One training record ready for the UNet: cached features and this step's draws."""

    latent: torch.Tensor  # [4, h, w] VAE latent (before the model's latent scaling)
    context: torch.Tensor  # [L, 2048] text encoder output (the empty prompt's when the text is dropped)
    pooled: torch.Tensor  # [1280]
    adm_size: tuple[int, int, int, int]  # original height, width, crop top, crop left (SDXL micro-conditioning)
    layout: Layout
    image_features: torch.Tensor  # [N, G, E] CLIP vision penultimate states of one reference per subject
    phrases: torch.Tensor  # [N, 768] CLIP-L pooled (unprojected) label embeddings
    dino_cls: torch.Tensor | None  # [N, D] DINO CLS of the target cropped at each box
    dino_patch_mean: torch.Tensor | None  # [D] mean of the target's DINO patch tokens
    noise: torch.Tensor  # [4, h, w]
    timestep: int  # 0..999
    drop_image: bool


def lcm_context(contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack text contexts of different lengths as ComfyUI batches them (conds.CONDCrossAttn): repeat to the LCM."""
    lengths = [c.shape[0] for c in contexts]
    n = math.lcm(*lengths)
    return torch.stack([c.repeat(n // c.shape[0], 1) for c in contexts])


class AlignmentCapture:
    """Collects the features the alignment losses compare during one UNet forward (see the module docstring)."""

    def __init__(self, modules: set[tuple[str, int]]):
        self.modules = modules
        self.self_feats: dict[tuple, torch.Tensor] = {}  # layer -> [B, C] mean self-attention output
        self.cross_feats: dict[tuple, list[torch.Tensor | None]] = {}  # layer -> per sample [N, C] region means

    def wants(self, extra_options: dict) -> tuple | None:
        block = extra_options.get("block")
        if block is None or (block[0], int(block[1])) not in self.modules:
            return None
        return block[0], int(block[1]), int(extra_options.get("block_index", 0))

    def attn1_output(self, n: torch.Tensor, extra_options: dict) -> torch.Tensor:
        key = self.wants(extra_options)
        if key is not None:
            self.self_feats[key] = n.float().mean(1)
        return n


class TrainingAttention:
    """The attn2 replace of one training forward: text attention for the batch plus each sample's image term.

    Every sample has its own layout and tokens, so each gets its own ``RegionalAttentionPatch`` (trainable) and
    its own run dict (K/V computed once per forward and layer); a sample whose image condition is dropped gets no
    image term, as the joint semantics' unconditional branch.
    """

    def __init__(self, patches: Sequence[RegionalAttentionPatch | None], sigmas: Sequence[float],
                 capture: AlignmentCapture | None, attention: Callable = sdpa_attention):
        self.patches = list(patches)
        self.sigmas = list(sigmas)
        self.runs: list[dict] = [{} for _ in patches]
        self.capture = capture
        self.attention = attention

    def prepare(self, keys, device, dtypes) -> None:
        """Compute every sample's K/V per layer and its level gates before the UNet runs.

        Gradient checkpointing recomputes each block in the backward pass; work cached on the first call would be
        skipped in the recomputation (a different graph), so what the run caches is built outside the blocks.
        """
        for patch, run, sigma in zip(self.patches, self.runs, self.sigmas):
            if patch is None:
                continue
            for dtype in dtypes:
                for key in keys:
                    patch.projections(run, key, device, dtype)
                patch.token_scales(run, sigma, device, dtype)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        block = extra_options["block"]
        key = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
        out = self.attention(q, k, v, heads)
        shape = extra_options["original_shape"]
        h, w = grid_of_tokens(q.shape[1], int(shape[-2]), int(shape[-1]))
        aligned = self.capture is not None and self.capture.wants(extra_options) is not None
        terms, region_means = [], []
        for b, patch in enumerate(self.patches):
            if patch is None:
                terms.append(torch.zeros_like(q[b:b + 1]))
                region_means.append(None)
                continue
            ip = patch.image_attention(q[b:b + 1], key, h, w, self.sigmas[b], heads, run=self.runs[b])
            terms.append(ip)
            if aligned:
                m = patch.layout.masks(h, w, edge="binary").flatten(1).to(ip.device, torch.float32)  # [N, P]
                region_means.append((m @ ip[0].float()) / m.sum(1, keepdim=True).clamp_min(1.0))
        if aligned:
            self.capture.cross_feats[key] = region_means
        return out + torch.cat(terms)


def adapter_prediction(adapter: SdxlAdapter, base: FrozenSdxl, samples: Sequence[Sample], alpha: float,
                       capture: AlignmentCapture | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The frozen UNet's prediction with ``adapter``'s image term (``RegionalAttentionPatch``, trainable: the
    inference patch keeping its autograd graph; none for a sample whose image is dropped), the objective's target,
    and the patches: the forward pass of every SDXL method."""
    device = base.device
    patches, sigmas = [], []
    for s in samples:
        sigmas.append(float(base.sigmas[s.timestep]))
        if s.drop_image:
            patches.append(None)
            continue
        boxes = torch.tensor(s.layout.boxes, dtype=torch.float32, device=device)
        tokens = adapter.subject_tokens(s.image_features.to(device), boxes, s.phrases.to(device),
                                        refine=adapter.refiner is not None, alpha=alpha)
        patches.append(RegionalAttentionPatch(adapter, tokens, s.layout, RegionalParams(), trainable=True,
                                              attention=base.attention, sigma_to_t=base.sigma_to_t))
    attn = TrainingAttention(patches, sigmas, capture, base.attention)
    pred, target = base.predict(samples, attn, capture)
    return pred, target, patches


class SdxlTrainModule(nn.Module):
    """What trains (the adapter, and MultiPersona's projectors) and the loss of one batch.

    The frozen base (``FrozenSdxl``) is held outside the module tree, so that DDP and the optimiser see only the
    trained parameters.
    """

    def __init__(self, adapter: SdxlAdapter, method: str, *, dino_dim: int | None = None,
                 align_widths: Sequence[int] = (), align_blocks: str = "down+mid", projection_width: int = 512,
                 projector_dropout: float = 0.1, seed: int = 0):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.adapter = adapter
        self.method = method
        self.align_blocks = align_blocks
        self.projection: nn.Module | None = None
        if method in ("r3", "multipersona"):
            if dino_dim is None:
                raise ValueError(f"the {method} method aligns with DINO features: give the DINO width")
            if method == "r3":
                self.projection = OrthogonalProjection(dino_dim, align_widths, projection_width, seed)
            else:
                self.projection = TrainableProjection(dino_dim, align_widths, projection_width, projector_dropout)

    @property
    def aligns(self) -> bool:
        return self.projection is not None

    def forward(self, base: FrozenSdxl, samples: Sequence[Sample], alpha: float, align_weight: float) -> dict:
        """Losses of one batch: ``loss`` (Eq. 11 of R^3-Adapter / Eq. 8 of MultiPersona-Align), its parts and the
        alignment cosines (reported even when the alignment weight is 0)."""
        device = base.device
        capture = AlignmentCapture(align_modules(self.align_blocks)) if self.aligns else None
        pred, target, patches = adapter_prediction(self.adapter, base, samples, alpha, capture)
        diffusion = F.mse_loss(pred.float(), target.float())
        out = {"diffusion": diffusion}
        total = diffusion
        if capture is not None:
            cross, self_ = self.alignment(capture, samples, device)
            out["cos_cross"] = 1.0 - cross.detach()
            out["cos_self"] = 1.0 - self_.detach()
            align = cross + self_  # Eq. 10 of R^3-Adapter
            out["align"] = align
            if align_weight > 0:
                total = total + align_weight * align  # Eq. 11 / Eq. 8
        if torch.is_grad_enabled() and all(p is None for p in patches):
            # every image dropped (CFG dropout): a zero that still reaches every parameter, so the backward pass
            # and DDP's gradient averaging run as on any other step
            total = total + 0.0 * sum(p.float().sum() for p in self.parameters())
        out["loss"] = total
        return out

    def alignment(self, capture: AlignmentCapture, samples: Sequence[Sample], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_cross, L_self) averaged over aligned layers and samples (Eqs. 8-9 of R^3-Adapter, 5-6 of MultiPersona)."""
        cross_terms, self_terms = [], []
        for per_sample in capture.cross_feats.values():
            for s, h in zip(samples, per_sample):
                if h is None or s.dino_cls is None:
                    continue  # a dropped image condition has no subject features
                target = self.projection(s.dino_cls.to(device), h.shape[-1], "cross")
                cross_terms.append(cosine_loss(h, target).mean())  # 1/N sum_j of Eq. 8
        for h in capture.self_feats.values():
            for b, s in enumerate(samples):
                if s.dino_patch_mean is None:
                    continue
                target = self.projection(s.dino_patch_mean.to(device)[None], h.shape[-1], "self")[0]
                self_terms.append(cosine_loss(h[b], target))
        zero = torch.zeros((), device=device)
        cross = torch.stack(cross_terms).mean() if cross_terms else zero
        self_ = torch.stack(self_terms).mean() if self_terms else zero
        return cross, self_


# --------------------------------------------------------------------------- the frozen base


class FrozenSdxl:
    """The frozen SDXL UNet of a ComfyUI ``BaseModel`` and what the loss needs from it.

    ``predict`` noises the latents at each sample's timestep (x_t = x0 + sigma * eps in ComfyUI's k-diffusion
    parametrisation, sigma from the model's own schedule), runs the UNet with the training attention, and returns
    the prediction and the target of the checkpoint's objective: eps for an epsilon model, v = sqrt(abar) eps -
    sqrt(1 - abar) x0 for a v-prediction model (abar = 1 / (1 + sigma^2)).
    """

    def __init__(self, base_model, device, dtype: torch.dtype = torch.float32,
                 attention: Callable = sdpa_attention):
        import comfy.model_sampling

        self.base_model = base_model
        self.unet = base_model.diffusion_model
        self.device = torch.device(device)
        self.dtype = dtype
        self.attention = attention
        self.sampling = base_model.model_sampling
        self.sigmas = self.sampling.sigmas.detach().float().cpu()
        self.v_prediction = isinstance(self.sampling, comfy.model_sampling.V_PREDICTION)
        self.sigma_to_t = self._sigma_to_t
        self.layer_widths = attn2_widths(self.unet)

    def _sigma_to_t(self, sigma: float) -> float:
        return float(self.sampling.timestep(torch.tensor([float(sigma)])).float()[0]) / NUM_TIMESTEPS

    def adm(self, samples: Sequence[Sample]) -> torch.Tensor:
        rows = []
        for s in samples:
            h, w, top, left = s.adm_size
            latent_h, latent_w = s.latent.shape[-2] * 8, s.latent.shape[-1] * 8
            rows.append(self.base_model.encode_adm(pooled_output=s.pooled[None].float(), width=w, height=h,
                                                   crop_w=left, crop_h=top, target_width=latent_w,
                                                   target_height=latent_h))
        return torch.cat(rows)

    def predict(self, samples: Sequence[Sample], attn: TrainingAttention,
                capture: AlignmentCapture | None) -> tuple[torch.Tensor, torch.Tensor]:
        dev, dt = self.device, self.dtype
        x0 = self.base_model.process_latent_in(torch.stack([s.latent for s in samples]).float()).to(dev)
        eps = torch.stack([s.noise for s in samples]).float().to(dev)
        sigma = torch.tensor([float(self.sigmas[s.timestep]) for s in samples], device=dev)
        x = x0 + eps * sigma[:, None, None, None]
        xc = self.sampling.calculate_input(sigma, x)
        timestep = self.sampling.timestep(sigma).float()
        context = lcm_context([s.context.float() for s in samples]).to(dev)
        y = self.adm(samples).to(dev)
        keys = attn2_keys(self.unet)
        dtypes = {dt}
        if torch.is_autocast_enabled(dev.type):  # the attention then runs in the autocast dtype
            dtypes.add(torch.get_autocast_dtype(dev.type))
        attn.prepare(keys, dev, dtypes)
        patches = {"attn2": {key: attn for key in keys}}
        options: dict = {"patches_replace": patches, "patches": {}}
        if capture is not None:
            options["patches"]["attn1_output_patch"] = [capture.attn1_output]
        out = self.unet(xc.to(dt), timestep, context=context.to(dt), y=y.to(dt), transformer_options=options)
        return out.float(), objective_target(self.v_prediction, sigma, x0, eps)


def objective_target(v_prediction: bool, sigma: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for x_t = x0 + sigma * eps: eps (epsilon models) or, for v-prediction,
    v = sqrt(abar) eps - sqrt(1 - abar) x0 with abar = 1 / (1 + sigma^2) (Salimans & Ho 2022, in ComfyUI's sigmas)."""
    if not v_prediction:
        return eps
    abar = (1.0 / (1.0 + sigma.float() ** 2))[:, None, None, None]
    return abar.sqrt() * eps - (1.0 - abar).sqrt() * x0


def unet_transformer_blocks(unet) -> list[tuple[tuple[str, int, int], nn.Module]]:
    """Every transformer block of a ComfyUI SDXL UNet with its attn2 key (block, id, block_index)."""
    parts = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    parts += [("middle", 0, unet.middle_block)]
    parts += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    found = []
    for name, idx, block in parts:
        for layer in block:
            for j, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                found.append(((name, idx, j), tb))
    return found


def attn2_keys(unet) -> list[tuple[str, int, int]]:
    return [k for k, tb in unet_transformer_blocks(unet) if getattr(tb, "attn2", None) is not None]


def attn2_widths(unet) -> dict[tuple[str, int, int], tuple[int, int]]:
    """(context width, inner width) of every attn2, keyed like ``attn2_keys``."""
    return {k: (int(tb.attn2.to_k.weight.shape[1]), int(tb.attn2.to_k.weight.shape[0]))
            for k, tb in unet_transformer_blocks(unet) if getattr(tb, "attn2", None) is not None}


def enable_gradient_checkpointing(unet) -> int:
    """Recompute every transformer block and ResBlock of the trainer's own UNet copy in the backward pass.

    ComfyUI's UNet ignores its ``use_checkpoint`` flag, so each block's ``forward`` is wrapped on the instance
    (never on a model the user's graph shares: the trainer owns this copy). Returns the number of blocks wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    count = 0
    for module in unet.modules():
        if type(module).__name__ not in ("BasicTransformerBlock", "ResBlock") or "forward" in module.__dict__:
            continue
        inner = module.forward

        def wrapped(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            # the UNet keeps updating one transformer_options dict ("block", "block_index") as it goes: the
            # recomputation in the backward pass must see this block's values, so it gets a snapshot
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        module.forward = wrapped
        count += 1
    return count


# --------------------------------------------------------------------------- the adapter to train


def new_adapter(method: str, unet, sizes, seed: int = 0) -> SdxlAdapter:
    """A fresh adapter for ``unet`` sized by ``sizes`` (``config.AdapterConfig``): MS-Diffusion's layout (``troupe-r3`` with refiner and router for r3).

    As IP-Adapter's and MS-Diffusion's training code do, each layer's ``to_k_ip`` / ``to_v_ip`` starts as a copy of
    the UNet's own ``to_k`` / ``to_v``; the rest keeps torch's default initialisation (seeded), the refiner its
    s_l = 0.1 (Sec. 3.2.1 of R^3-Adapter) and the router its initial anchors (Sec. 3.3).
    """
    from ..models.sdxl.adapter import depths_for, sdxl_layer_keys
    from ..models.sdxl.refiner import RefinerConfig
    from ..models.sdxl.resampler import ResamplerConfig

    widths = attn2_widths(unet)
    depths = depths_for(len(widths))
    keys = sdxl_layer_keys(depths)
    missing = [k for k in keys if k not in widths]
    if missing:
        raise ValueError(f"the UNet lacks the SDXL cross-attention layers {missing[:4]}: is it an SDXL UNet?")
    cross = {widths[k][0] for k in keys}
    if len(cross) != 1:
        raise ValueError(f"the UNet's cross-attention layers take different context widths {sorted(cross)}")
    cross_dim = cross.pop()
    resampler = ResamplerConfig(dim=sizes.resampler_dim, depth=sizes.resampler_depth, heads=sizes.resampler_heads,
                                dim_head=sizes.resampler_dim_head, num_queries=sizes.tokens,
                                embedding_dim=sizes.image_width, output_dim=cross_dim, ff_mult=sizes.ff_mult,
                                queries="grounding", phrase_dim=sizes.phrase_dim, fourier_freqs=8,
                                attention_norm=True)
    refiner = None
    if method == "r3":
        refiner = RefinerConfig(dim=cross_dim, tokens=sizes.tokens, heads=sizes.refiner_heads,
                                window=sizes.refiner_window, topk=tuple(sizes.refiner_topk))
    fmt = "troupe-r3" if method == "r3" else "ms-diffusion"
    torch.manual_seed(int(seed))  # torch's default initialisers draw from the global generator
    adapter = SdxlAdapter(fmt, layer_widths=[widths[k][1] for k in keys], cross_dim=cross_dim, resampler=resampler,
                          refiner=refiner, alpha=0.0, num_dummy_tokens=sizes.dummy_tokens)
    blocks = dict(unet_transformer_blocks(unet))
    with torch.no_grad():
        for k in keys:
            to_k, to_v = adapter.kv(k)
            to_k.weight.copy_(blocks[k].attn2.to_k.weight.float())
            to_v.weight.copy_(blocks[k].attn2.to_v.weight.float())
    return adapter.float()


def adapter_for_method(method: str, initial: SdxlAdapter | None, unet, sizes,
                       seed: int = 0) -> SdxlAdapter:
    """The adapter a run trains: a copy of ``initial`` (R^3 from an MS-Diffusion file gains a fresh refiner and
    router, as R^3-Adapter starts from MS-Diffusion's weights), or a new one."""
    import copy

    if initial is None:
        return new_adapter(method, unet, sizes, seed)
    if initial.semantics != "joint":
        raise ValueError(f"the initial adapter is an {initial.format} file; training continues MS-Diffusion or R^3 "
                         "files (joint attention with grounding tokens)")
    if method != "r3" or initial.refiner is not None:
        if method != "r3" and initial.refiner is not None:
            raise ValueError(f"the initial adapter is an R^3 file but the method is {method}; use method r3")
        return copy.deepcopy(initial).float().train()
    from ..models.sdxl.refiner import RefinerConfig

    refiner = RefinerConfig(dim=initial.cross_dim, tokens=initial.tokens_per_subject, heads=sizes.refiner_heads,
                            window=sizes.refiner_window, topk=tuple(sizes.refiner_topk))
    torch.manual_seed(int(seed))
    adapter = SdxlAdapter("troupe-r3", layer_widths=initial.layer_widths, cross_dim=initial.cross_dim,
                          resampler=initial.image_proj.config, refiner=refiner, alpha=0.0,
                          num_dummy_tokens=initial.dummy_tokens.shape[1])
    missing, unexpected = adapter.load_state_dict(initial.state_dict(), strict=False)
    if unexpected or any(not (k.startswith(("refiner.", "router."))) for k in missing):
        raise ValueError(f"the initial adapter does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return adapter.float().train()


# --------------------------------------------------------------------------- the method's side of a Trainer


class SdxlMethod:
    """What ``Trainer`` asks of an SDXL method (r3, ms-diffusion, multipersona): the frozen UNet and the adapter (with
    its alignment projection), the SDXL caches, the data stream's samples and the adapter file. The loop,
    checkpoints, resume and logs stay the trainer's."""

    def setup_models(self, trainer, c) -> None:
        from .trainer import comfy_attention, compute_dtype, frozen_base, probe_dino_width

        cfg = trainer.config
        base = frozen_base(trainer, c)
        device = trainer.acc.device
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(base.diffusion_model)
        trainer.frozen = FrozenSdxl(base, device, dtype=compute_dtype(base), attention=comfy_attention())
        initial = c.initial_adapter
        adapter = adapter_for_method(cfg.method.name, initial, base.diffusion_model, cfg.adapter, cfg.train.seed)
        adapter.to(device)
        widths = attn2_widths(base.diffusion_model)
        modules = align_modules(cfg.method.align_blocks)
        align_widths = sorted({w[1] for k, w in widths.items() if (k[0], k[1]) in modules})
        dino_dim = None
        if c.dino is not None:
            dino_dim = int(probe_dino_width(c.dino))
        trainer.module = SdxlTrainModule(adapter, cfg.method.name, dino_dim=dino_dim, align_widths=align_widths,
                                         align_blocks=cfg.method.align_blocks,
                                         projection_width=cfg.method.projection_width,
                                         projector_dropout=cfg.method.projector_dropout, seed=cfg.train.seed).to(device)

    def setup_data(self, trainer, c) -> None:
        from pathlib import Path

        from .data import Encoders, FeatureStore

        cfg = trainer.config
        adapter = trainer.module.adapter
        cache = cfg.data.cache_dir or (Path(cfg.train.output_dir) / "cache")
        dino = c.dino if trainer.module.aligns else None
        trainer.encoders = Encoders(vae=c.vae, clip=c.clip, clip_vision=c.clip_vision, dino=dino,
                                    image_crop=adapter.trained_crop)
        trainer.store = FeatureStore(trainer.records, trainer.encoders, Path(cache), cfg.data.resolution,
                                     cfg.data.dino_resolution,
                                     image_features=lambda f: adapter.image_features(f.for_crop(adapter.trained_crop)))
        trainer.precompute("caching features", lambda step: trainer.store.fill(progress=lambda *_: step()))
        trainer.empty = trainer.store.empty_text()
        trainer.layouts = [trainer.store.layout(i) for i in range(len(trainer.records))]

    def sample_at(self, trainer, position: int) -> Sample:
        """The record at ``position`` (a seeded permutation per epoch) and its draws."""
        from .trainer import record_index, sample_seed

        cfg = trainer.config
        n = len(trainer.records)
        i = record_index(cfg.train.seed, position, n)
        feats = trainer.store.features(i)
        layout, adm_size = trainer.layouts[i]
        gen = torch.Generator().manual_seed(sample_seed(cfg.train.seed, position))
        latent = feats["latent"]
        noise = torch.randn(latent.shape, generator=gen)
        timestep = int(torch.randint(0, len(trainer.frozen.sigmas), (1,), generator=gen))
        counts = [int(c) for c in feats["counts"].tolist()]
        starts = [sum(counts[:j]) for j in range(len(counts))]
        pick = [s + int(torch.randint(0, c, (1,), generator=gen)) for s, c in zip(starts, counts)]
        d = cfg.dropout
        u = float(torch.rand((), generator=gen))  # one draw: text only, image only, both, or neither dropped
        drop_text = u < d.text or d.text + d.image <= u < d.text + d.image + d.both
        drop_image = d.text <= u < d.text + d.image or d.text + d.image <= u < d.text + d.image + d.both
        text = trainer.empty if drop_text else feats
        return Sample(latent=latent, context=text["context"], pooled=text["pooled"], adm_size=adm_size,
                      layout=layout, image_features=feats["features"][pick], phrases=feats["phrases"],
                      dino_cls=feats.get("cls"), dino_patch_mean=feats.get("patch_mean"), noise=noise,
                      timestep=timestep, drop_image=drop_image)

    def save_adapter(self, trainer, path) -> None:
        """The adapter as a ``TroupeLoadAdapter`` file (the refiner's alpha set to this step's warm-up value)."""
        from ..models.sdxl.formats import save_sdxl_adapter

        adapter = trainer.unwrapped().adapter
        if adapter.refiner is not None:
            m = trainer.config.method
            alpha, _ = phase_schedule(max(trainer.step - 1, 0), m.name, m.phase1_steps, m.ramp_steps, m.align_weight)
            adapter.refiner.alpha.fill_(alpha)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_sdxl_adapter(str(path), adapter)
