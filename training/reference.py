"""Reference-branch training on FLUX: the reference LoRA with MOSAIC's correspondence and disentanglement losses.

MOSAIC: Multi-Subject Personalized Generation via Correspondence-Aware Alignment and Disentanglement (only its
abstract is public; the LoRA layout follows its published code). What trains: the reference LoRA (MOSAIC's
target modules, saved in the pack's ``troupe`` layout), nothing else; the base stays frozen.

- **The branch**: each subject's reference latent runs through the DiT as extra tokens with its own modulation
  (t = ``ReferenceOptions.timestep`` = 0), the LoRA on the reference tokens only, exactly the block code the
  ``TroupeReferenceBranch`` node runs (``models/reference/blocks.py`` through ``hooks.ReferencePatch``), fed a
  fresh stream per forward (``hooks.training_stream``: no run cache, every tensor keeps its autograd graph).
  Positions: the ``troupe`` layout's "as trained" meaning (the same index for every reference), so the saved file
  loads with the node's defaults.
- **Objective**: FLUX.1-dev's flow matching (``training.flux.FrozenFlux``) plus
  ``correspondence_weight * L_corr + disentangle_weight * L_dis`` read at ``method.attention_layers``:
  - ``L_corr`` (semantic correspondence attention loss): for every annotated target point, the image token that
    holds it attends over the reference tokens of its subject, softmax(q k^T / sqrt(d)) over those columns only,
    mean over heads; the loss is the cross-entropy against the reference token that holds the corresponding point,
    averaged over points (``correspondence_loss``).
  - ``L_dis`` (multi-reference disentanglement loss): each subject's attention map over image tokens, a_s[i] = the
    joint attention mass image token i puts on subject s's reference tokens (the full joint softmax, mean over
    heads, the very map ``TroupeAttentionMaps`` draws); the loss is the mean over subject pairs of the squared
    cosine similarity cos(a_s, a_t)^2 (``disentanglement_loss``): 0 when the maps are disjoint (orthogonal, as
    the maps are non-negative), 1 when they are identical up to scale. Squared, so that its gradient fades as maps
    separate and the loss never rewards anti-correlation (non-negative maps cannot be anti-correlated anyway);
    the cosine, so the loss does not depend on how much attention the references get in total, only on where.
- **Rows**: attention probabilities are computed explicitly only for the rows the losses read: the annotated
  target tokens (against their subject's reference tokens) and at most ``method.attention_rows`` image rows (an
  even stride) against all keys for ``L_dis``; the block's own attention runs unchanged through the user's kernel.

A second reference-branch method plugs in by subclassing ``ReferenceTrainModule`` (``prepare_sample``: extra
context processing, e.g. a learned token and a DEM; ``attention_losses``: its own attention terms; extra trainable
modules as attributes) and ``ReferenceMethod`` (``module_for``, ``save_extra``) and registering its name in
``training/config.py`` (METHODS, FLUX_METHODS, REFERENCE_METHODS) and ``trainer.method_for``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layout.grid import token_grid
from ..models.reference.branch import (
    SAME_INDEX,
    STATE_KEY,
    ReferenceBranch,
    ReferenceOptions,
    prepare_reference_image,
)
from ..models.reference.hooks import ReferencePatch, training_stream
from ..models.reference.lora import FluxDims, LoRAPart, ReferenceLoRA, mosaic_targets
from .flux import FrozenFlux, for_recomputation, guarded, out_of_place

METHOD = "mosaic"
REFERENCE_FILL = 0.9  # prepare_reference_image's default: the subject fills 90% of the white square (MOSAIC)


# --------------------------------------------------------------------------- the two losses (pure functions)


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) over the keys, mean over heads, in float32: q [B, H, P, d], k [B, H, T, d],
    bias [B, P, T] or None -> [B, P, T]."""
    logits = torch.einsum("bhpd,bhtd->bhpt", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[:, None].float()
    return torch.softmax(logits, dim=-1).mean(1)


def correspondence_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of attention rows against the corresponding reference token: probs [K, R] (each row a
    distribution over one subject's reference tokens), target [K] (the token holding the corresponding point)
    -> mean_k -log probs[k, target_k]."""
    picked = probs.gather(1, target.long()[:, None])[:, 0]
    return -torch.log(picked.clamp_min(1e-30)).mean()


def subject_maps(probs: torch.Tensor, owners: torch.Tensor, subjects: int) -> torch.Tensor:
    """Each subject's attention map over the image rows: probs [P, T] (joint attention rows), owners [T] (the
    subject of each key, -1 for text and image keys) -> [S, P], the mass each row puts on each subject."""
    one_hot = F.one_hot(torch.where(owners < 0, subjects, owners).long(), subjects + 1)[:, :subjects]
    return (probs @ one_hot.to(probs.dtype)).T


def disentanglement_loss(maps: torch.Tensor) -> torch.Tensor:
    """Mean over subject pairs s < t of cos(a_s, a_t)^2: maps [S, P] -> a scalar in [0, 1]; 0 for disjoint maps,
    1 for identical ones; 0 (still a graph node) for fewer than two subjects."""
    s = maps.shape[0]
    if s < 2:
        return maps.sum() * 0.0
    unit = maps / maps.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    i, j = torch.triu_indices(s, s, offset=1)
    return cos[i, j].square().mean()


# --------------------------------------------------------------------------- where the points are


def target_token(point: tuple[float, float], size: tuple[int, int], resolution: int,
                 grid: tuple[int, int]) -> int | None:
    """The image token holding a normalised point of the original target (x, y), through the trainer's centre
    square crop (``training.data.SquareCrop``) at ``resolution``; None when the crop cut it off."""
    from .data import SquareCrop

    h, w = size
    crop = SquareCrop(h, w, resolution)
    top, left = crop.offset
    u, v = (point[0] * w - left) / crop.side, (point[1] * h - top) / crop.side
    if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
        return None
    gh, gw = grid
    return min(int(v * gh), gh - 1) * gw + min(int(u * gw), gw - 1)


def reference_token(point: tuple[float, float], size: tuple[int, int], grid: tuple[int, int],
                    fill: float = REFERENCE_FILL) -> int:
    """The reference token holding a normalised point (x, y) of a reference image of ``size`` (h, w), through
    ``prepare_reference_image`` with no mask (centred on a white square whose side is max(h, w) / fill)."""
    h, w = size
    side = max(1, round(max(h, w) / fill))
    y0, x0 = (side - h) // 2, (side - w) // 2
    u, v = (x0 + point[0] * w) / side, (y0 + point[1] * h) / side
    gh, gw = grid
    return min(max(int(v * gh), 0), gh - 1) * gw + min(max(int(u * gw), 0), gw - 1)


def flux_attention():
    """ComfyUI's FLUX attention (``comfy.ldm.flux.math.attention``: the user's backend), what the node's branch runs."""
    import comfy.ldm.flux.math

    return comfy.ldm.flux.math.attention


# --------------------------------------------------------------------------- what trains


def mosaic_modules(dims: FluxDims) -> list[str]:
    """MOSAIC's LoRA target modules (its published PEFT layout, ``lora.mosaic_targets``) as ComfyUI module names:
    img_in; per double block img_mod.lin, img_attn.qkv, img_attn.proj, img_mlp.2; per single block modulation.lin,
    linear1, linear2."""
    return sorted({module for module, *_ in mosaic_targets(dims).values()})


class TrainableReferenceLoRA(nn.Module):
    """The reference LoRA as parameters, one (down [r, in], up [out, r]) pair per ComfyUI module (the ``troupe``
    layout, scale 1): PEFT's initialisation (down Kaiming-uniform with a = sqrt(5), up zeros), so training starts
    exactly at the base weights."""

    def __init__(self, dims: FluxDims, rank: int, modules: Sequence[str] | None = None, seed: int = 0):
        super().__init__()
        from ..models.reference.lora import troupe_targets

        targets = troupe_targets(dims)
        self.names = list(modules if modules is not None else mosaic_modules(dims))
        self.rank = int(rank)
        gen = torch.Generator().manual_seed(int(seed))
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        for name in self.names:
            _, _, rows, fin = targets[name]
            bound = 1.0 / math.sqrt(fin)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound gain * sqrt(3 / fan_in)
            key = name.replace(".", "__")
            self.down[key] = nn.Parameter(torch.empty(self.rank, fin).uniform_(-bound, bound, generator=gen))
            self.up[key] = nn.Parameter(torch.zeros(rows, self.rank))

    def lora(self) -> ReferenceLoRA:
        """The parameters as the inference branch's ``ReferenceLoRA`` (the same tensors: gradients reach them)."""
        parts = {n: (LoRAPart(0, self.down[n.replace(".", "__")], self.up[n.replace(".", "__")], 1.0),)
                 for n in self.names}
        return ReferenceLoRA(parts, "troupe", self.rank, 2 * len(self.names))

    def troupe_state_dict(self) -> dict[str, torch.Tensor]:
        """``<module>.lora_down.weight`` / ``.lora_up.weight`` (the ``troupe`` layout ``load_reference_lora`` reads)."""
        out = {}
        for n in self.names:
            key = n.replace(".", "__")
            out[f"{n}.lora_down.weight"] = self.down[key].detach().float().cpu().contiguous()
            out[f"{n}.lora_up.weight"] = self.up[key].detach().float().cpu().contiguous()
        return out


# --------------------------------------------------------------------------- one batch


@dataclass
class ReferenceSample:
    """One record ready for the DiT: cached latents and text, and this step's draws."""

    latent: torch.Tensor  # [16, h, w] the target's FLUX VAE latent (before the model's latent scaling)
    context: torch.Tensor  # [L, C] T5 output (the empty prompt's when the text is dropped)
    pooled: torch.Tensor  # [768] CLIP-L pooled
    references: torch.Tensor  # [S, 16, rh, rw] each subject's first reference (before the latent scaling)
    points: list[tuple[torch.Tensor, torch.Tensor]]  # per subject: (target tokens [K], reference tokens [K])
    noise: torch.Tensor  # [16, h, w]
    sigma: float
    drop_image: bool  # classifier-free guidance: no reference stream
    labels: tuple[str, ...] = ()
    record: int = -1


def layer_names(spec: str, double: int, single: int) -> list[tuple[str, int]]:
    """``method.attention_layers`` as (kind, index) pairs of this DiT; an index past its depth is a ConfigError."""
    from .config import ConfigError

    if spec in ("double", "all"):
        out = [("double", i) for i in range(double)]
    else:
        out = []
    if spec in ("single", "all"):
        out += [("single", i) for i in range(single)]
    if spec in ("double", "single", "all"):
        return out
    for name in spec.split(","):
        kind, index = name.strip().split(".")
        kind, index = kind.removesuffix("_blocks"), int(index)
        if index >= (double if kind == "double" else single):
            raise ConfigError(f"method.attention_layers: {name.strip()} is not in this model ({double} double and "
                              f"{single} single blocks); name blocks it has")
        out.append((kind, index))
    return out


class AttentionProbe:
    """The blocks' attention function in one training forward (batch 1 per forward).

    It runs the attention unchanged; at the layers the losses read, its first call of the block (text + image
    queries over every key, ``blocks.joint_attention``) also computes the explicit attention probabilities of the
    rows the losses need and keeps the per-layer terms (with their graphs).
    """

    def __init__(self, attention, layers: Sequence[tuple[str, int]], n_txt: int, n_img: int,
                 ref_lengths: Sequence[int], points: Sequence[tuple[torch.Tensor, torch.Tensor]], max_rows: int,
                 want_maps: bool = True):
        self.attention = attention
        self.layers = set(layers)
        self.n_txt, self.n_img = n_txt, n_img
        self.ref_starts = [sum(ref_lengths[:i]) for i in range(len(ref_lengths))]
        self.ref_lengths = list(ref_lengths)
        self.points = list(points)
        stride = max(1, math.ceil(n_img / max_rows))
        self.rows = torch.arange(0, n_img, stride)
        self.owners = torch.cat([torch.full((n,), i) for i, n in enumerate(ref_lengths)]) if ref_lengths else None
        self.want_maps = want_maps and len(ref_lengths) > 1
        self.current: tuple[str, int] | None = None
        self.done = True
        self.correspondence: list[torch.Tensor] = []
        self.disentangle: list[torch.Tensor] = []
        self.replaying = False  # set once the forward is done: gradient checkpointing's recomputation reads again

    def enter(self, kind: str, index: int) -> None:
        self.current, self.done = (kind, index), (kind, index) not in self.layers

    def __call__(self, q, k, v, *args, mask=None, **kwargs):
        out = self.attention(q, k, v, *args, mask=mask, **kwargs)
        n_base = self.n_txt + self.n_img
        if self.done or k.shape[2] != n_base + sum(self.ref_lengths) or q.shape[2] < n_base:
            return out
        self.done = True
        self.read(q, k, mask)
        return out

    def read(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The layer's terms from rotated queries q [B, H, >= T + N, d] and all keys k [B, H, T + N + R, d]."""
        n_base, dev = self.n_txt + self.n_img, q.device
        terms = []
        for s, (tgt, ref) in enumerate(self.points):
            if not len(tgt):
                continue
            cols = slice(n_base + self.ref_starts[s], n_base + self.ref_starts[s] + self.ref_lengths[s])
            probs = attention_probs(q[:, :, self.n_txt + tgt.to(dev)], k[:, :, cols])  # [B, K, R_s]
            terms += [correspondence_loss(p, ref.to(dev)) * len(tgt) for p in probs]
        # in the backward pass's recomputation the same terms are computed again (checkpointing replays every op of
        # the block) but not kept: the loss already holds the forward's
        keep = not self.replaying
        if terms:
            term = torch.stack(terms).sum() / sum(len(t) for t, _ in self.points) / q.shape[0]
            if keep:
                self.correspondence.append(term)
        if self.want_maps:
            rows = self.n_txt + self.rows.to(dev)
            bias = None
            if mask is not None:
                bias = (mask[:, 0] if mask.ndim == 4 else mask).expand(q.shape[0], -1, -1)[:, rows]
            probs = attention_probs(q[:, :, rows], k, bias)  # [B, P, T]
            owners = torch.cat([torch.full((n_base,), -1), self.owners]).to(dev)
            subjects = len(self.ref_lengths)
            term = torch.stack([disentanglement_loss(subject_maps(p, owners, subjects)) for p in probs]).mean()
            if keep:
                self.disentangle.append(term)


class ReferenceInjection:
    """The ``patches_replace["dit"]`` of one training forward: ``ReferencePatch.dit_block`` (the inference hook)
    on every block, with this forward's stream in the block's options and the probe told which block runs."""

    def __init__(self, patch: ReferencePatch | None, stream, probe: AttentionProbe | None):
        self.patch, self.stream, self.probe = patch, stream, probe

    def prepare(self, double: int, single: int, head_dim: int, device, dtypes) -> None:
        """Nothing to build before the DiT runs: the stream is made fresh for this forward."""

    def replaces(self, double: int, single: int, checkpointed: bool = False) -> dict:
        """``patches_replace["dit"]``: ``block`` for every block; ``checkpointed``: each recomputed in the backward
        pass (``checkpointed_block``)."""
        run = self.checkpointed_block if checkpointed else self.block
        out = {}
        for kind, count in (("double_block", double), ("single_block", single)):
            for i in range(count):
                out[(kind, i)] = (lambda a, e, _k=(kind, i): run(_k, a, e))
        return out

    def block(self, key: tuple[str, int], args: dict, extra: dict) -> dict:
        if self.patch is None:  # no references (CFG dropout): the base block, autograd-safe as dynaip runs it
            return guarded(extra["original_block"], args)(args)
        if self.probe is not None:
            self.probe.enter(key[0].removesuffix("_block"), key[1])
        to = dict(args.get("transformer_options") or {})
        to[STATE_KEY] = {id(self.patch): self.stream}
        return self.patch.dit_block(key, dict(args, transformer_options=to), extra, {})

    def checkpointed_block(self, key: tuple[str, int], args: dict, extra: dict) -> dict:
        """One block over ``[txt | img | refs]`` under gradient checkpointing: its activations, the reference
        stream's included, are recomputed in the backward pass instead of kept.

        The region is a function of the block's streams and the reference hidden states it reads (``stream.x``,
        which the block replaces with its output): the recomputation sets ``stream.x`` back to the block's input,
        so it computes what the forward did. The probe's terms of the block (MOSAIC's losses) are made inside the
        region, so their backward recomputes it too; ``probe.enter`` is inside, so the recomputation reads the same
        rows. The reference block code adds out of place, so the inputs the recomputation reads are never
        overwritten, and the numbers are those of ``block``. Without references (CFG dropout) it is the dynaip
        trainer's checkpointed base block.
        """
        from torch.utils.checkpoint import checkpoint

        if not torch.is_grad_enabled():
            return self.block(key, args, extra)
        args, extra = for_recomputation(args, extra)
        if self.patch is None:
            return checkpoint(lambda a, e: out_of_place(e["original_block"])(a), args, extra, use_reentrant=False)
        stream = self.stream

        def region(a: dict, e: dict, ref_x: torch.Tensor):
            stream.x = ref_x
            out = self.block(key, a, e)
            return out, stream.x

        out, stream.x = checkpoint(region, args, extra, stream.x, use_reentrant=False)
        return out


@dataclass(frozen=True)
class LossSettings:
    correspondence_weight: float = 0.1
    disentangle_weight: float = 0.1
    attention_layers: str = "double"
    attention_rows: int = 256


class ReferenceTrainModule(nn.Module):
    """What trains (the reference LoRA, plus whatever a subclass adds as attributes) and the loss of one batch.

    Subclass hooks: ``prepare_sample`` (the sample's context and the stream's per-item text positions, e.g. a
    learned token and a DEM), ``attention_losses`` (terms from the probe; MOSAIC's here). The frozen base
    (``FrozenFlux``) is held outside the module tree, so DDP and the optimiser see only these parameters.
    """

    method = METHOD
    aligns = False

    def __init__(self, lora: TrainableReferenceLoRA, options: ReferenceOptions | None = None,
                 losses: LossSettings | None = None):
        super().__init__()
        self.lora = lora
        self.options = options or ReferenceOptions(positions=SAME_INDEX)
        self.losses = losses or LossSettings()

    # ---------------------------------------------------------------- hooks for other reference methods

    def prepare_sample(self, base: FrozenFlux, sample: ReferenceSample):
        """(sample, item_positions, item_blocked) the forward uses: unchanged here."""
        return sample, None, None

    def attention_losses(self, probe: AttentionProbe | None) -> dict[str, torch.Tensor]:
        """Weighted attention terms of one sample (each a scalar with its graph), and their total under "extra"."""
        zero = torch.zeros(())
        if probe is None:
            return {"correspondence": zero, "disentangle": zero, "extra": zero}
        corr = torch.stack(probe.correspondence).mean() if probe.correspondence else zero
        dis = torch.stack(probe.disentangle).mean() if probe.disentangle else zero
        w = self.losses
        return {"correspondence": corr, "disentangle": dis,
                "extra": w.correspondence_weight * corr + w.disentangle_weight * dis}

    def wants_probe(self, sample: ReferenceSample) -> bool:
        w = self.losses
        return (w.correspondence_weight > 0 and any(len(t) for t, _ in sample.points)) or (
            w.disentangle_weight > 0 and sample.references.shape[0] > 1)

    # ---------------------------------------------------------------- the forward

    def branch(self, base: FrozenFlux, sample: ReferenceSample) -> ReferenceBranch:
        lora = self.lora.lora()
        if base.dtype != torch.float32 or base.device.type != "cpu":
            lora = lora.to(base.device, base.dtype)  # a differentiable cast, per forward
        latents = [base.base_model.process_latent_in(r[None].float())[0].to(base.device) for r in sample.references]
        return ReferenceBranch(dit=base.dit, latents=latents, ref_subject=list(range(len(latents))),
                               options=self.options, lora=lora, compute_dtype=base.dtype)

    def one(self, base: FrozenFlux, sample: ReferenceSample) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample, item_positions, item_blocked = self.prepare_sample(base, sample)
        if sample.drop_image:
            pred, target = base.predict([sample], ReferenceInjection(None, None, None))
            return F.mse_loss(pred.float(), target.float()), self.attention_losses(None)
        branch = self.branch(base, sample)
        grid = token_grid(int(sample.latent.shape[-2]), int(sample.latent.shape[-1]), branch.patch)
        y = sample.pooled[None].to(base.device, base.dtype)
        stream = training_stream(branch, y, 1, grid, base.dtype, base.device, item_positions, item_blocked)
        stream.n_txt = int(sample.context.shape[0])
        probe = None
        if self.wants_probe(sample):
            layers = layer_names(self.losses.attention_layers, base.double_blocks, base.single_blocks)
            probe = AttentionProbe(flux_attention(), layers, stream.n_txt, grid[0] * grid[1],
                                   [h * w for h, w in branch.grids()], sample.points, self.losses.attention_rows,
                                   want_maps=self.losses.disentangle_weight > 0)
        patch = ReferencePatch(branch, probe or flux_attention())
        pred, target = base.predict([sample], ReferenceInjection(patch, stream, probe))
        if probe is not None:
            probe.replaying = True
        return F.mse_loss(pred.float(), target.float()), self.attention_losses(probe)

    def forward(self, base: FrozenFlux, samples: Sequence[ReferenceSample], alpha: float = 0.0,
                align_weight: float = 0.0) -> dict:
        """``loss`` = flow-matching MSE + the weighted attention terms, each the mean over the batch's samples
        (one forward per sample: each has its own references); ``alpha`` / ``align_weight`` unused."""
        parts = [self.one(base, s) for s in samples]
        diffusion = torch.stack([d for d, _ in parts]).mean()
        out = {"diffusion": diffusion}
        for key in parts[0][1]:
            out[key] = torch.stack([t[key].to(diffusion.device) for _, t in parts]).mean()
        loss = diffusion + out.pop("extra")
        if torch.is_grad_enabled() and all(s.drop_image for s in samples):
            loss = loss + 0.0 * sum(p.float().sum() for p in self.parameters())  # every parameter gets a zero grad
        out["loss"] = loss
        return out


# --------------------------------------------------------------------------- the cache


def first_reference_size(prepared, j: int) -> tuple[int, int]:
    ref = prepared.references[j][0]
    return int(ref.shape[0]), int(ref.shape[1])


class ReferenceFeatureStore:
    """The cached features of a reference-branch run: every target's FLUX latent and caption encoding (the FLUX
    kinds of ``FluxFeatureStore``) and each subject's first reference, prepared as the node prepares references
    (``prepare_reference_image``, on white, at ``reference_size``) and VAE-encoded, with the sizes the point
    mapping needs."""

    def __init__(self, records, encoders, root: Path, resolution: int, reference_size: int):
        from .data import DiskCache, FluxFeatureStore, module_fingerprint

        self.flux = FluxFeatureStore(records, encoders, root, resolution)
        self.records, self.enc, self.resolution = self.flux.records, encoders, int(resolution)
        self.reference_size = int(reference_size)
        vae_model = getattr(encoders.vae, "first_stage_model", None)
        self.references = DiskCache(root, "flux-reference", module_fingerprint(vae_model),
                                    (self.resolution, self.reference_size, REFERENCE_FILL))

    def _references(self, i: int) -> dict[str, torch.Tensor]:
        from .data import prepare

        p = prepare(self.records[i], self.resolution)
        pixels = torch.stack([prepare_reference_image(refs[0], None, self.reference_size, REFERENCE_FILL)
                              for refs in p.references])
        with torch.inference_mode():
            latents = self.enc.vae.encode(pixels)
        sizes = torch.tensor([first_reference_size(p, j) for j in range(len(p.references))], dtype=torch.float32)
        h, w = int(p.crop.height), int(p.crop.width)
        return {"references": latents.float().clone(), "reference_sizes": sizes,
                "target_size": torch.tensor([h, w], dtype=torch.float32)}

    def features(self, i: int) -> dict[str, torch.Tensor]:
        record = self.records[i]
        c = self.flux.caches
        out = dict(c["latent"].get(record, lambda: self.flux._latent(self._prepared(i))))
        out.update(c["text"].get(record, lambda: self.flux._text(record.caption, ())))
        out.update(self.references.get(record, lambda: self._references(i)))
        return out

    def _prepared(self, i: int):
        from .data import prepare

        return prepare(self.records[i], self.resolution)

    def empty_text(self) -> dict[str, torch.Tensor]:
        return self.flux.empty_text()

    def fill(self, progress=None) -> None:
        for k in range(len(self.records)):
            self.features(k)
            if progress is not None:
                progress(k + 1, len(self.records))


def sample_points(record, feats: dict[str, torch.Tensor], resolution: int, patch: int = 2):
    """Per subject (target tokens [K], reference tokens [K]) of its manifest correspondences; points the square
    crop cuts off are dropped."""
    grid = token_grid(int(feats["latent"].shape[-2]), int(feats["latent"].shape[-1]), patch)
    ref_grid = token_grid(int(feats["references"].shape[-2]), int(feats["references"].shape[-1]), patch)
    size = (int(feats["target_size"][0]), int(feats["target_size"][1]))
    out = []
    for j, s in enumerate(record.subjects):
        ref_size = (int(feats["reference_sizes"][j][0]), int(feats["reference_sizes"][j][1]))
        tgt, ref = [], []
        for rx, ry, tx, ty in s.correspondences:
            t = target_token((tx, ty), size, resolution, grid)
            if t is not None:
                tgt.append(t)
                ref.append(reference_token((rx, ry), ref_size, ref_grid))
        out.append((torch.tensor(tgt, dtype=torch.long), torch.tensor(ref, dtype=torch.long)))
    return out


# --------------------------------------------------------------------------- the method's side of a Trainer


class ReferenceMethod:
    """What ``Trainer`` asks of a reference-branch method (mosaic): the frozen DiT and what trains, the caches,
    the data stream and the LoRA file. The loop, checkpoints, resume and logs stay the trainer's.

    Hooks for another reference method: ``module_for`` (its ``ReferenceTrainModule`` subclass with extra trainable
    modules), ``save_extra`` (its other files beside the LoRA), ``draw`` (extra per-sample draws)."""

    name = METHOD
    log_keys = ("correspondence", "disentangle")  # the two attention terms, unweighted, in log.csv

    def module_for(self, trainer, c, lora: TrainableReferenceLoRA) -> ReferenceTrainModule:
        m = trainer.config.method
        return ReferenceTrainModule(lora, ReferenceOptions(positions=SAME_INDEX),
                                    LossSettings(m.correspondence_weight, m.disentangle_weight, m.attention_layers,
                                                 m.attention_rows))

    def setup_models(self, trainer, c) -> None:
        from .config import ConfigError
        from .trainer import comfy_attention, compute_dtype, frozen_base

        cfg = trainer.config
        if cfg.method.init_adapter:
            raise ConfigError(f'method.init_adapter: not available for method.name "{cfg.method.name}" yet (a new '
                              "reference LoRA starts at the base weights); remove it")
        base = frozen_base(trainer, c)
        device = trainer.acc.device
        trainer.frozen = FrozenFlux(base, device, dtype=compute_dtype(base), attention=comfy_attention(),
                                    gradient_checkpointing=trainer.config.train.gradient_checkpointing)
        dit = base.diffusion_model
        layer_names(cfg.method.attention_layers, len(dit.double_blocks), len(dit.single_blocks))  # checked now
        lora = TrainableReferenceLoRA(FluxDims.from_model(dit), cfg.method.lora_rank, seed=cfg.train.seed)
        trainer.module = self.module_for(trainer, c, lora).to(device)

    def setup_data(self, trainer, c) -> None:
        from .data import Encoders

        cfg = trainer.config
        cache = cfg.data.cache_dir or (Path(cfg.train.output_dir) / "cache")
        trainer.encoders = Encoders(vae=c.vae, clip=c.clip, clip_vision=None, dino=None)
        trainer.store = ReferenceFeatureStore(trainer.records, trainer.encoders, Path(cache), cfg.data.resolution,
                                              cfg.data.resolution)
        trainer.precompute("caching features", lambda step: trainer.store.fill(progress=lambda *_: step()))
        trainer.empty = trainer.store.empty_text()

    def sample_at(self, trainer, position: int) -> ReferenceSample:
        """Record and draws at ``position`` (a seeded permutation of the manifest per epoch; noise, sigma from the
        model's shifted table, CFG dropout); the evaluation stream drops nothing."""
        from .trainer import EVAL_STREAM, record_index, sample_seed

        cfg = trainer.config
        i = record_index(cfg.train.seed, position, len(trainer.records))
        feats = trainer.store.features(i)
        gen = torch.Generator().manual_seed(sample_seed(cfg.train.seed, position))
        latent = feats["latent"]
        noise = torch.randn(latent.shape, generator=gen)
        sigma = float(trainer.frozen.sigmas[int(torch.randint(0, len(trainer.frozen.sigmas), (1,), generator=gen))])
        d = cfg.dropout
        u = float(torch.rand((), generator=gen))  # one draw: text only, image only, both, or neither dropped
        drop_text = u < d.text or d.text + d.image <= u < d.text + d.image + d.both
        drop_image = d.text <= u < d.text + d.image or d.text + d.image <= u < d.text + d.image + d.both
        if position >= EVAL_STREAM:
            drop_text = drop_image = False
        record = trainer.records[i]
        text = trainer.empty if drop_text else feats
        sample = ReferenceSample(latent=latent, context=text["context"], pooled=text["pooled"],
                                 references=feats["references"],
                                 points=sample_points(record, feats, cfg.data.resolution),
                                 noise=noise, sigma=sigma, drop_image=drop_image,
                                 labels=tuple(s.label for s in record.subjects), record=i)
        return self.draw(trainer, sample, gen)

    def draw(self, trainer, sample: ReferenceSample, gen: torch.Generator) -> ReferenceSample:
        """Extra per-sample draws of another reference method (after this one's, from the same generator)."""
        return sample

    def save_adapter(self, trainer, path) -> None:
        """The reference LoRA in the ``troupe`` layout (``TroupeReferenceBranch`` loads it from models/troupe or
        models/loras), then ``save_extra``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        module = trainer.unwrapped()
        metadata = {"format": "troupe.reference-lora", "method": trainer.config.method.name,
                    "rank": str(module.lora.rank), "positions": SAME_INDEX}
        save_file(module.lora.troupe_state_dict(), str(path), metadata=metadata)
        self.save_extra(trainer, path)

    def save_extra(self, trainer, path: Path) -> None:
        """Other files of another reference method, beside the LoRA file."""


def with_points(sample: ReferenceSample, points) -> ReferenceSample:
    return dataclasses.replace(sample, points=points)
