"""DynaIP training on FLUX: the image cross-attention of every double and single block and the HMoE fusion.

Plain torch around ComfyUI's frozen FLUX DiT. What trains (DynaIP, "Implementation Details"): the adapter's layers
(``FluxImageAdapter``, saved as ``troupe-flux``) and the HMoE fusion (``HMoE``, Eqs. 6-8, saved as ``troupe.hmoe``);
the base stays frozen. The image term is ``FluxInjection``, the very patch ``TroupeApplyFLUX`` installs, built
``trainable`` so that the tokens, the fusion before them and every block's K/V keep their gradient.

- **Objective**: FLUX.1-dev's rectified-flow matching, as ComfyUI's ``CONST`` sampling defines it:
  x_t = (1 - sigma) x0 + sigma * noise, the model predicts v and ``calculate_denoised`` returns x_t - sigma * v,
  so the target is v = noise - x0.
- **Timesteps**: sigma uniform over the model's own shifted table (``ModelSamplingFlux.sigmas``: sigma =
  e^mu / (e^mu + 1/t - 1) for t uniform in (0, 1], mu = the model's shift, 1.15 for FLUX.1-dev), which puts more
  samples at high noise than a uniform sigma.
- **DDS training** (Eq. 5): the term goes to both branches (text tokens too, M = 1); inference uses the image branch.
- **Dropout**: text, image and both at 5% each (classifier-free guidance), and each HMoE expert's feature dropped
  independently with ``method.expert_dropout`` (5%), training only.
- **Stages**: the first ``method.stage1_steps`` draw intra-pair records only, the rest cross-pair records only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.encoding.hmoe import HMoE, HMoEConfig, hmoe_metadata
from ..models.flux.adapter import FluxImageAdapter, new_troupe_adapter, save_troupe_flux
from ..models.flux.injection import BOTH, InjectionParams, sdpa_attention
from ..models.flux.patch import GEOMETRY_KEY, AttentionHook, FluxInjection, geometry
from ..models.layout.grid import token_grid
from ..models.layout.layout import Layout

METHOD = "dynaip"
GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance input during training: our choice (diffusers' FLUX trainers use 3.5)
CLIP_LAYERS = "10,17,24"  # DynaIP "Implementation Details": CLIP layers 10, 17, 24 feed the low, mid, high experts


# --------------------------------------------------------------------------- the objective


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) of rectified flow: x_t = (1 - sigma) x0 + sigma * noise, target v = noise - x0 (FLUX.1)."""
    s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0


def stage_of(step: int, stage1_steps: int) -> str:
    """Which records step ``step`` draws (DynaIP "Implementation Details"): "intra" first, then "cross"."""
    return "intra" if step < stage1_steps else "cross"


def stage_records(kinds: Sequence[str]) -> dict[str, list[int]]:
    """The manifest indices of each stage, in manifest order (the seeded permutation is taken over these)."""
    return {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ("intra", "cross")}


def staged_record(seed: int, position: int, per_step: int, stage1_steps: int, stages: dict[str, list[int]]) -> int:
    """The record at a training position: the position's step (``per_step`` = the global batch) picks the stage,
    and the stage's own seeded permutation over its records (filtered first) picks the record. It depends on the
    global batch only, so any number of processes sees the same stream."""
    from .trainer import record_index

    stage = stage_of(position // per_step, stage1_steps)
    pool = stages[stage]
    start = 0 if stage == "intra" else stage1_steps * per_step
    return pool[record_index(seed + (0 if stage == "intra" else 1), position - start, len(pool))]


def expert_drops(gen: torch.Generator, subjects: int, levels: int, rate: float) -> torch.Tensor:
    """[N, L] bool: each HMoE expert's feature dropped independently with ``rate`` (DynaIP, training only)."""
    return torch.rand(subjects, levels, generator=gen) < rate


# --------------------------------------------------------------------------- one batch


@dataclass
class FluxSample:
    """One record ready for the DiT: cached features and this step's draws."""

    latent: torch.Tensor  # [16, h, w] FLUX VAE latent (before the model's latent scaling)
    context: torch.Tensor  # [L, C] T5 output (the empty prompt's when the text is dropped)
    pooled: torch.Tensor  # [768] CLIP-L pooled
    layout: Layout
    levels: torch.Tensor  # [N, 3, G, D] CLIP layers 10/17/24 of one reference per subject
    noise: torch.Tensor  # [16, h, w]
    sigma: float
    drop_image: bool
    expert_drop: torch.Tensor  # [N, 3] bool


class OutOfPlace(torch.Tensor):
    """A tensor whose ``+=`` makes a new tensor. ComfyUI's FLUX blocks and T5 add their residuals in place
    (``x += ...``), which autograd refuses once a tensor saved for the backward pass is overwritten; given inputs of
    this type (every op's result keeps the type), the same arithmetic runs out of place, with the same numbers."""

    def __iadd__(self, other):
        return torch.add(self, other)


STREAMS = ("img", "txt")  # a block's token streams in a patches_replace["dit"] call (a single block's is "img")


def frozen_closure(fn: Callable) -> Callable:
    """A copy of ``fn`` whose free variables hold the values they have now (a closure made in a loop otherwise
    sees the loop's later values when called afterwards)."""
    import types

    if not isinstance(fn, types.FunctionType) or not fn.__closure__:
        return fn
    cells = tuple(types.CellType(c.cell_contents) for c in fn.__closure__)
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)


def _plain(value):
    """``value`` (a tensor or a tuple of them) as plain ``torch.Tensor``, without ``OutOfPlace``."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


class TrainingInjection:
    """The ``patches_replace["dit"]`` function of one training forward: each sample its own ``FluxInjection``.

    Every sample has its own layout and tokens, so the block's query is split per sample and each sample's term
    (``FluxInjection.computation``, the inference code) is computed on its own row; a sample whose image is dropped
    gets none. K/V are computed once per forward and block in each sample's run dict.
    """

    def __init__(self, patches: Sequence[FluxInjection | None], patch_size: int = 2):
        self.patches = list(patches)
        self.runs: list[dict] = [{} for _ in patches]
        self.patch_size = patch_size

    def __call__(self, args: dict, extra: dict, guard: bool = True) -> dict:
        original = guarded(extra["original_block"], args) if guard else extra["original_block"]
        to = args.get("transformer_options") or {}
        active = [(b, p) for b, p in enumerate(self.patches) if p is not None]
        if not active:
            return original(args)
        kind = "double" if "txt" in args else "single"
        index = int(extra["troupe_block"][1])
        lh, lw, n_txt = geometry(to, f"{kind} block")
        gh, gw = token_grid(lh, lw, self.patch_size)
        spans = active[0][1].spans(kind, args, n_txt, gh * gw)
        pe = args["pe"]
        batch = args["img"].shape[0]
        computes = []
        for b, p in active:
            pe_b = pe[b:b + 1] if pe is not None and pe.shape[0] > 1 else pe
            computes.append((b, p.computation(self.runs[b], kind, index, pe_b, p.lambdas[None], lh, lw, spans)))

        def compute(q: torch.Tensor):
            rows: list[list[torch.Tensor | None]] = [[None] * batch for _ in spans]
            for b, fn in computes:
                for j, (_, delta, _, _) in enumerate(fn(q[b:b + 1])):
                    rows[j][b] = delta
            adds = []
            for j, (off, n, stream, stream_off, _) in enumerate(spans):
                zero = q.new_zeros(1, n, q.shape[1] * q.shape[3])
                adds.append((off, torch.cat([r if r is not None else zero for r in rows[j]]), stream, stream_off))
            return adds

        hook = AttentionHook(compute, to.get("optimized_attention_override"), batch,
                             max(off + n for off, n, *_ in spans))
        return original(dict(args, transformer_options=dict(to, optimized_attention_override=hook)))

    def prepare(self, double: int, single: int, head_dim: int, device, dtypes) -> None:
        """Every sample's K/V for every block, before the DiT runs: gradient checkpointing recomputes each block in
        the backward pass, and work cached on the first call would be skipped in the recomputation (a different
        graph), so what the run caches is built outside the blocks."""
        for patch, run in zip(self.patches, self.runs):
            if patch is None:
                continue
            for dtype in dtypes:
                for kind, count in (("double", double), ("single", single)):
                    for index in range(count):
                        patch.kv(run, kind, index, device, dtype, head_dim)

    def replaces(self, double: int, single: int, checkpointed: bool = False) -> dict:
        """``patches_replace["dit"]``: this object for every block, told which block it is; ``checkpointed``: each
        block recomputed in the backward pass (``checkpointed``)."""
        run = self.checkpointed if checkpointed else self
        out = {}
        for kind, count in (("double_block", double), ("single_block", single)):
            for i in range(count):
                out[(kind, i)] = (lambda a, e, _k=(kind, i): run(a, dict(e, troupe_block=_k)))
        return out

    def checkpointed(self, args: dict, extra: dict) -> dict:
        """One block with its image term under gradient checkpointing: its activations are recomputed in the
        backward pass instead of kept.

        The whole call is the checkpointed region, so the recomputation builds the block's ``AttentionHook`` anew
        (it acts once per call). ComfyUI's blocks add to their streams in place; inside the region the streams are
        ``OutOfPlace`` tensors, so the region's inputs, which the recomputation reads again, are never overwritten
        (and no saved tensor needs ``guarded``'s copies). The numbers are those of the plain call.
        """
        from torch.utils.checkpoint import checkpoint

        if not torch.is_grad_enabled():
            return self(args, extra)
        args, extra = for_recomputation(args, extra)
        return checkpoint(lambda a, e: out_of_place(lambda x: self(x, e, guard=False))(a), args, extra,
                          use_reentrant=False)


def for_recomputation(args: dict, extra: dict) -> tuple[dict, dict]:
    """A block call's ``args`` and ``extra`` as a checkpointed region must keep them: the DiT updates one
    transformer_options dict as it goes, and ComfyUI's block_wrap reads the loop's ``block`` variable when it is
    called, so the recomputation, after the loop moved on, gets this block's options and this block."""
    args = dict(args, transformer_options=dict(args.get("transformer_options") or {}))
    return args, dict(extra, original_block=frozen_closure(extra["original_block"]))


def out_of_place(block: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """``block`` run on ``OutOfPlace`` streams (its in-place residual adds then leave its inputs intact, which a
    recomputation reads again), its outputs plain tensors."""

    def run(args: dict) -> dict:
        args = {k: v.as_subclass(OutOfPlace) if k in STREAMS and isinstance(v, torch.Tensor) else v
                for k, v in args.items()}
        return {k: _plain(v) for k, v in block(args).items()}

    return run


def guarded(block: Callable, args: dict) -> Callable:
    """The block with autograd-safe residuals: ComfyUI's FLUX blocks add to their input streams in place
    (``img += ...``) after a norm saved them for the backward pass; every saved tensor that shares storage with a
    stream is saved as a copy, so those additions no longer invalidate it (the numbers are unchanged)."""
    streams = {t.untyped_storage().data_ptr() for k in ("img", "txt") if isinstance(t := args.get(k), torch.Tensor)}

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.untyped_storage().data_ptr() in streams else t

    def run(a: dict) -> dict:
        if not torch.is_grad_enabled():
            return block(a)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return block(a)

    return run


class FluxTrainModule(nn.Module):
    """What trains (the adapter's projection and per-block K/V, and the HMoE fusion) and the loss of one batch.

    The frozen base (``FrozenFlux``) is held outside the module tree, so DDP and the optimiser see only these.
    """

    def __init__(self, adapter: FluxImageAdapter, fusion: HMoE):
        super().__init__()
        self.adapter = adapter
        self.fusion = fusion
        self.method = METHOD

    aligns = False

    def tokens(self, levels: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
        """C_i [N, T, D]: HMoE-fused tokens (Eq. 8, experts dropped in training) through the adapter's projection."""
        fused = self.fusion(levels, dropped=dropped if self.training else None).fused
        return self.adapter.image_proj(fused)

    def injections(self, base: FrozenFlux, samples: Sequence[FluxSample]) -> list[FluxInjection | None]:
        out = []
        for s in samples:
            if s.drop_image:
                out.append(None)
                continue
            param = next(self.fusion.parameters())
            tokens = self.tokens(s.levels.to(param.device, param.dtype), s.expert_drop)
            out.append(FluxInjection(self.adapter, tokens, InjectionParams(dds=BOTH), s.layout, base.double_blocks,
                                     trainable=True, attention=base.attention))
        return out

    def forward(self, base: FrozenFlux, samples: Sequence[FluxSample], alpha: float = 0.0,
                align_weight: float = 0.0) -> dict:
        """``loss`` = ``diffusion``: the flow-matching MSE of the batch (``alpha`` / ``align_weight`` unused)."""
        patches = self.injections(base, samples)
        pred, target = base.predict(samples, TrainingInjection(patches))
        diffusion = F.mse_loss(pred.float(), target.float())
        loss = diffusion
        if torch.is_grad_enabled() and not any(p is not None for p in patches):
            # every image dropped (CFG dropout): a zero that still reaches every parameter, so the backward pass
            # and DDP's gradient averaging run as on any other step
            loss = loss + 0.0 * sum(p.float().sum() for p in self.parameters())
        return {"diffusion": diffusion, "loss": loss}


# --------------------------------------------------------------------------- the frozen base


class FrozenFlux:
    """The frozen FLUX DiT of a ComfyUI ``BaseModel`` and the flow-matching prediction and target of a batch."""

    def __init__(self, base_model, device, dtype: torch.dtype = torch.float32, attention: Callable = sdpa_attention,
                 gradient_checkpointing: bool = False):
        self.base_model = base_model
        self.gradient_checkpointing = gradient_checkpointing
        self.dit = base_model.diffusion_model
        self.device = torch.device(device)
        self.dtype = dtype
        self.attention = attention
        self.sampling = base_model.model_sampling
        self.sigmas = self.sampling.sigmas.detach().float().cpu()  # the shifted schedule, ascending
        self.double_blocks = len(self.dit.double_blocks)
        self.single_blocks = len(self.dit.single_blocks)
        self.guidance = bool(getattr(self.dit.params, "guidance_embed", False))
        self.head_dim = int(self.dit.params.hidden_size // self.dit.params.num_heads)

    def predict(self, samples: Sequence[FluxSample], injection: TrainingInjection) -> tuple[torch.Tensor, torch.Tensor]:
        from .sdxl import lcm_context

        dev, dt = self.device, self.dtype
        x0 = self.base_model.process_latent_in(torch.stack([s.latent for s in samples]).float()).to(dev)
        noise = torch.stack([s.noise for s in samples]).float().to(dev)
        sigma = torch.tensor([s.sigma for s in samples], device=dev)
        x_t, target = flow_matching_pair(x0, noise, sigma)
        xc = self.sampling.calculate_input(sigma, x_t)
        timestep = self.sampling.timestep(sigma).float()
        context = lcm_context([s.context.float() for s in samples]).to(dev)
        y = torch.stack([s.pooled.float() for s in samples]).to(dev)
        guidance = torch.full((len(samples),), GUIDANCE, device=dev) if self.guidance else None
        dtypes = {dt}
        if torch.is_autocast_enabled(dev.type):  # the attention then runs in the autocast dtype
            dtypes.add(torch.get_autocast_dtype(dev.type))
        injection.prepare(self.double_blocks, self.single_blocks, self.head_dim, dev, dtypes)
        replaces = injection.replaces(self.double_blocks, self.single_blocks, self.gradient_checkpointing)
        options = {"patches_replace": {"dit": replaces},
                   "patches": {}, GEOMETRY_KEY: (int(x0.shape[-2]), int(x0.shape[-1]), int(context.shape[1]))}
        if guidance is not None:
            guidance = guidance.to(dt)
        # as BaseModel._apply_model: the timestep stays float32, the latent and the conditions take the model's dtype
        out = self.dit(xc.to(dt), timestep, context.to(dt), y=y.to(dt), guidance=guidance,
                       transformer_options=options)
        return out.float(), target


# --------------------------------------------------------------------------- what trains and what is saved


def new_modules(dit, encoder_width: int, sizes, seed: int = 0) -> tuple[FluxImageAdapter, HMoE]:
    """A fresh ``troupe-flux`` adapter for ``dit`` and an HMoE fusion (expert width ``sizes.fusion_width``, 0 = the
    DiT's width), torch's default initialisation, seeded."""
    nd, ns = len(dit.double_blocks), len(dit.single_blocks)
    block = dit.double_blocks[0]
    hidden, heads = int(block.hidden_size), int(block.num_heads)
    width = sizes.fusion_width or encoder_width
    torch.manual_seed(int(seed))
    fusion = HMoE(HMoEConfig(in_dim=encoder_width, out_dim=width, router_hidden=sizes.router_hidden))
    adapter = new_troupe_adapter(width, hidden, hidden // heads, nd, ns)
    return adapter.float().train(), fusion.float().train()


def save_outputs(module: FluxTrainModule, adapter_path, layers: Sequence[int] = (10, 17, 24)):
    """The adapter (``troupe-flux``, for TroupeLoadAdapter) and beside it ``<stem>.hmoe.safetensors`` (for
    TroupeLoadFusion); returns the fusion's path."""
    from pathlib import Path

    from safetensors.torch import save_file

    adapter_path = Path(adapter_path)
    adapter_path.parent.mkdir(parents=True, exist_ok=True)
    save_troupe_flux(str(adapter_path), module.adapter)
    fusion_path = fusion_path_for(adapter_path)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in module.fusion.state_dict().items()}
    save_file(sd, str(fusion_path), metadata=hmoe_metadata(layers))
    return fusion_path


def fusion_path_for(adapter_path):
    """Where the fusion file of an adapter file goes: ``x.safetensors`` -> ``x.hmoe.safetensors``."""
    return adapter_path.with_name(adapter_path.stem + ".hmoe.safetensors")


# --------------------------------------------------------------------------- the method's side of a Trainer


class FluxMethod:
    """What ``Trainer`` asks of a FLUX method (dynaip): the frozen DiT and what trains, the FLUX caches, the staged
    data stream and the two output files. The loop, checkpoints, resume and logs stay the trainer's."""

    name = METHOD

    def setup_models(self, trainer, c) -> None:
        import copy

        from ..nodes.encoding import vision_blocks
        from .trainer import comfy_attention, compute_dtype, frozen_base

        cfg = trainer.config
        base = frozen_base(trainer, c)
        device = trainer.acc.device
        trainer.frozen = FrozenFlux(base, device, dtype=compute_dtype(base), attention=comfy_attention(),
                                    gradient_checkpointing=cfg.train.gradient_checkpointing)
        width = int(vision_blocks(c.clip_vision)[0].layer_norm1.weight.shape[0])
        adapter, fusion = new_modules(base.diffusion_model, width, cfg.adapter, cfg.train.seed)
        if c.initial_adapter is not None:
            adapter = copy.deepcopy(c.initial_adapter).float().train().requires_grad_(True)
        if getattr(c, "initial_fusion", None) is not None:
            fusion = copy.deepcopy(c.initial_fusion).float().train().requires_grad_(True)
        trainer.module = FluxTrainModule(adapter, fusion).to(device)

    def setup_data(self, trainer, c) -> None:
        from pathlib import Path

        from .data import Encoders, FluxFeatureStore

        cfg = trainer.config
        cache = cfg.data.cache_dir or (Path(cfg.train.output_dir) / "cache")
        trainer.encoders = Encoders(vae=c.vae, clip=c.clip, clip_vision=c.clip_vision, dino=None,
                                    image_crop=trainer.module.adapter.trained_crop)
        trainer.store = FluxFeatureStore(trainer.records, trainer.encoders, Path(cache), cfg.data.resolution,
                                         layers=CLIP_LAYERS)
        self.check_stages(trainer)
        trainer.precompute("caching features", lambda step: trainer.store.fill(progress=lambda *_: step()))
        trainer.empty = trainer.store.empty_text()
        trainer.layouts = [trainer.store.layout(i) for i in range(len(trainer.records))]

    def check_stages(self, trainer) -> None:
        """DynaIP's two stages need intra-pair records (stage 1) and cross-pair records (stage 2) when the run
        reaches them; refused by name otherwise."""
        from .config import ConfigError

        cfg = trainer.config
        self.stages = stage_records([r.kind for r in trainer.records])
        m, steps = cfg.method, cfg.train.steps
        for kind, needed in (("intra", min(m.stage1_steps, steps) > 0), ("cross", steps > m.stage1_steps)):
            if needed and not self.stages[kind]:
                raise ConfigError(f'method.stage1_steps: the run needs "{kind}" records (stage '
                                  f'{1 if kind == "intra" else 2}) but {cfg.data.manifest} has none; set kind = '
                                  f'"{kind}" on some records or change method.stage1_steps (now {m.stage1_steps})')

    def record_at(self, trainer, position: int) -> int:
        """The record at a training position: the stage's own seeded permutation over its records (filtered before
        the permutation, so the stream is the same for any number of processes); the evaluation stream draws from
        every record."""
        from .trainer import EVAL_STREAM, record_index

        cfg = trainer.config
        seed = cfg.train.seed
        if position >= EVAL_STREAM:
            return record_index(seed, position, len(trainer.records))
        t = cfg.train
        per_step = t.batch_size * t.grad_accum * trainer.acc.num_processes  # the global batch
        return staged_record(seed, position, per_step, cfg.method.stage1_steps, self.stages)

    def sample_at(self, trainer, position: int) -> FluxSample:
        """Record and draws at ``position`` (noise, sigma, reference, dropouts); the evaluation stream drops
        nothing."""
        from .trainer import EVAL_STREAM, sample_seed

        cfg = trainer.config
        i = self.record_at(trainer, position)
        feats = trainer.store.features(i)
        layout, _ = trainer.layouts[i]
        gen = torch.Generator().manual_seed(sample_seed(cfg.train.seed, position))
        latent = feats["latent"]
        noise = torch.randn(latent.shape, generator=gen)
        sigma = float(trainer.frozen.sigmas[int(torch.randint(0, len(trainer.frozen.sigmas), (1,), generator=gen))])
        counts = [int(n) for n in feats["counts"].tolist()]
        starts = [sum(counts[:j]) for j in range(len(counts))]
        pick = [s + int(torch.randint(0, n, (1,), generator=gen)) for s, n in zip(starts, counts)]
        d = cfg.dropout
        u = float(torch.rand((), generator=gen))  # one draw: text only, image only, both, or neither dropped
        drop_text = u < d.text or d.text + d.image <= u < d.text + d.image + d.both
        drop_image = d.text <= u < d.text + d.image or d.text + d.image <= u < d.text + d.image + d.both
        levels = feats["levels"][pick]
        experts = expert_drops(gen, levels.shape[0], levels.shape[1], cfg.method.expert_dropout)
        if position >= EVAL_STREAM:
            drop_text = drop_image = False
            experts = torch.zeros_like(experts)
        text = trainer.empty if drop_text else feats
        return FluxSample(latent=latent, context=text["context"], pooled=text["pooled"], layout=layout, levels=levels,
                          noise=noise, sigma=sigma, drop_image=drop_image, expert_drop=experts)

    def save_adapter(self, trainer, path) -> None:
        save_outputs(trainer.unwrapped(), path, [int(x) for x in CLIP_LAYERS.split(",")])
