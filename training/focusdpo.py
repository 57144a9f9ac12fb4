"""FocusDPO: focus-weighted preference tuning of a trained SDXL adapter.

MOSAIC/FocusDPO publishes only FocusDPO's abstract. It says the method "adaptively identifies focus regions based on
dynamic semantic correspondence and supervision image complexity", "progressively adjusts these focal areas across
noise timesteps", uses "a weighted strategy that rewards information-rich patches while penalizing regions with low
prediction confidence" and "dynamically adjusts focus allocation during the DPO process according to the semantic
complexity of reference images". Everything below that is more precise than those sentences is our design; each
choice is a config key (``[method]``, docs/training.md "focusdpo").

**The loss** is Diffusion-DPO (Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", Eq. 14), as its released training script computes it: for a pair (winner w, loser l) noised with the
same noise at the same timestep,

    inside = -beta / 2 * ((E_theta(w) - E_ref(w)) - (E_theta(l) - E_ref(l)))
    loss   = -log sigmoid(inside)

where E is the denoising error of the objective (eps or v) of the tuned adapter (theta) or of a frozen copy of the
starting adapter (ref). ``inside`` is the implicit preference margin: 0 when theta equals ref (so the loss is log 2),
positive when the tuned model fits the winner better, relative to ref, than the loser. FocusDPO's change: E is
not the mean over the latent but a weighted mean over latent patches, ``E = sum_p W_p e_p / sum_p W_p``.

**The focus map** ``W`` of one image (winner and loser each have their own), in latent patches:

1. *Semantic correspondence*: DINO patch tokens of the image are matched with those of each subject's reference
   (cosine similarity, best reference patch); an image patch inside subject i's box gets
   ``strength_p = max(0, max_q cos(f_p, g_q))``.
2. *Supervision complexity*: the matched reference patch's information, its gradient energy (mean Sobel magnitude of
   the luminance, normalised by the reference's largest patch), so a patch matching texture counts more than one
   matching a flat background: ``m_p = strength_p * (floor + (1 - floor) * complexity_{q*(p)})``.
3. *Focus allocation by reference complexity*: subject i's share is scaled by ``g_i`` = its reference's mean
   complexity over the mean of all subjects' (a detailed reference gets more focus than a plain one).
4. ``F = 1 + focus_strength * sum_i g_i m_i`` (background patches keep 1: they still count), scaled to mean 1.
5. *Timesteps*: ``W_t = (1 - s) + s F`` with ``s = (1 - t / 1000) ** focus_gamma``: uniform at the highest noise, the
   whole map at t = 0.
6. *Prediction confidence*: patches where the tuned model's error exceeds the reference model's are down-weighted,
   ``c_p = exp(-kappa * max(0, e_theta,p - e_ref,p) / mean_p e_ref,p)`` (no gradient through the weight), and
   ``W = W_t * c`` scaled to mean 1.

Steps 1-4 do not depend on the timestep or the model: they are computed once per record and cached with the other
features. Plain torch; the trainer (``training/trainer.py``) runs the loop.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layout.grid import token_grid
from .flux import CLIP_LAYERS, FluxMethod, TrainingInjection, save_outputs
from .sdxl import FrozenSdxl, Sample, SdxlMethod, adapter_prediction

METHOD = "focusdpo"
EPS = 1e-8


# --------------------------------------------------------------------------- the loss


def patch_errors(pred: torch.Tensor, target: torch.Tensor, patch: int) -> torch.Tensor:
    """Squared error of the objective per latent patch: [B, C, H, W] -> [B, ceil(H/patch), ceil(W/patch)] (the
    mean over channels and the patch's latent pixels; a partial edge patch averages what it holds)."""
    err = (pred.float() - target.float()).pow(2).mean(1, keepdim=True)
    return F.avg_pool2d(err, patch, ceil_mode=True, count_include_pad=False)[:, 0]


def weighted_error(errors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """E = sum_p W_p e_p / sum_p W_p per image: [B, h, w] x [B, h, w] -> [B]."""
    return (errors * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(EPS)


def dpo_loss(model_w: torch.Tensor, ref_w: torch.Tensor, model_l: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14; the -beta/2 scale of its released trainer): per pair the loss
    ``-log sigmoid(inside)`` and the implicit preference margin ``inside``."""
    inside = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return -F.logsigmoid(inside), inside


# --------------------------------------------------------------------------- the focus map


def timestep_share(timestep: torch.Tensor, gamma: float) -> torch.Tensor:
    """s = (1 - t / 1000) ** gamma: 0 at the highest noise (t = 1000, a uniform map), 1 at t = 0 (the whole map)."""
    t = timestep.float().clamp(0, 1000) / 1000.0
    return (1.0 - t).pow(gamma)


def mean_one(weights: torch.Tensor) -> torch.Tensor:
    """Each map [B, h, w] scaled to mean 1 (so beta means the same whatever the focus)."""
    return weights / weights.flatten(1).mean(1).clamp_min(EPS)[:, None, None]


def confidence(err_model: torch.Tensor, err_ref: torch.Tensor, kappa: float) -> torch.Tensor:
    """c_p = exp(-kappa * max(0, e_theta,p - e_ref,p) / mean_p e_ref,p) per image [B, h, w], without gradient."""
    scale = err_ref.detach().flatten(1).mean(1).clamp_min(EPS)[:, None, None]
    return torch.exp(-kappa * (err_model.detach() - err_ref.detach()).clamp_min(0) / scale)


def focus_weights(focus: torch.Tensor, timestep: torch.Tensor, err_model: torch.Tensor, err_ref: torch.Tensor,
                  gamma: float, kappa: float) -> torch.Tensor:
    """W = mean_one(((1 - s) + s F) * c): the cached map F [B, h, w] at this step's timesteps [B], times the
    confidence of this step's predictions (steps 5-6 of the module docstring)."""
    s = timestep_share(timestep, gamma).to(focus)[:, None, None]
    return mean_one(((1 - s) + s * focus) * confidence(err_model, err_ref, kappa))


def gradient_energy(image: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean Sobel magnitude of the luminance of IMAGE [H, W, 3] per cell of ``grid``, over its largest cell: [h, w]
    in [0, 1] (a flat image gives zeros)."""
    lum = (image[..., :3].float() * torch.tensor([0.299, 0.587, 0.114])).sum(-1)[None, None]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    k = torch.stack([kx, kx.t()])[:, None]
    g = F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), k)
    energy = F.adaptive_avg_pool2d(g.pow(2).sum(1, keepdim=True).sqrt(), grid)[0, 0]
    return energy / energy.max().clamp_min(EPS)


def box_cells(box: Sequence[float], grid: tuple[int, int]) -> torch.Tensor:
    """bool [h, w]: the cells of ``grid`` whose centre lies inside the normalised box (x0, y0, x1, y1)."""
    h, w = grid
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    x0, y0, x1, y1 = box
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def correspondence(image_tokens: torch.Tensor, reference_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(strength [P], match [P]): for each image patch token [P, D], the cosine with its best reference patch token
    [Q, D] (clamped at 0) and that patch's index."""
    sim = F.normalize(image_tokens.float(), dim=-1, eps=EPS) @ F.normalize(reference_tokens.float(), dim=-1, eps=EPS).t()
    best, match = sim.max(-1)
    return best.clamp_min(0), match


def focus_map(image_tokens: torch.Tensor, grid: tuple[int, int], boxes: Sequence[Sequence[float]],
              references: Sequence[tuple[torch.Tensor, torch.Tensor]], strength: float = 1.0,
              floor: float = 0.1) -> torch.Tensor:
    """F on the feature grid [h, w] (steps 1-4 of the module docstring).

    ``image_tokens`` [h*w, D]: the image's patch tokens; ``boxes``: each subject's box; ``references``: per subject
    (patch tokens [Q, D], their complexity [Q] in [0, 1]). ``floor``: the weight a perfectly flat matched patch keeps.
    """
    complexity = torch.stack([c.float().mean() for _, c in references])
    share = complexity / complexity.mean().clamp_min(EPS)  # step 3
    out = torch.ones(grid)
    for box, (tokens, cx), g in zip(boxes, references, share):
        inside = box_cells(box, grid)
        strength_p, match = correspondence(image_tokens, tokens)
        m = strength_p * (floor + (1 - floor) * cx.float()[match])
        out = out + strength * g * m.view(grid) * inside
    return out / out.mean()


def to_latent_grid(focus: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A map on the feature grid resampled to the latent patch grid (area average; bilinear when upsampling)."""
    f = focus[None, None].float()
    if grid[0] <= focus.shape[0] and grid[1] <= focus.shape[1]:
        out = F.adaptive_avg_pool2d(f, grid)
    else:
        out = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
    return mean_one(out[:, 0])[0]


def pixel_patch_tokens(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Raw pixel patches as features (mean-centred per patch, so a flat patch is the zero vector): [N, H, W, 3] ->
    ([N, P, patch*patch*3], grid). A transparent stand-in for DINO where the test must know the right answer."""
    x = images.permute(0, 3, 1, 2).float()
    cells = F.unfold(x, patch, stride=patch).transpose(1, 2)
    return cells - cells.mean(-1, keepdim=True), (images.shape[1] // patch, images.shape[2] // patch)


# --------------------------------------------------------------------------- a batch


@dataclass
class PairSample:
    """One preference pair ready for the UNet: the winner's ``Sample`` (conditioning, noise, timestep), the loser's
    latent, and both images' cached focus maps [2, h, w] on the latent patch grid."""

    sample: Sample
    loser: torch.Tensor
    focus: torch.Tensor


class FocusDpoModule(nn.Module):
    """What trains (``model``: the SDXL adapter, or the FLUX adapter with its fusion) and the loss of a batch of
    pairs; the reference model is a frozen copy of the starting one, held outside the module tree (no optimiser
    state, no DDP buckets, not in checkpoints). Subclasses say how a model predicts and where a sample's timestep is."""

    def __init__(self, model: nn.Module, *, beta: float, patch: int, gamma: float, kappa: float, focus: bool = True):
        super().__init__()
        self.model = model
        self._reference = [copy.deepcopy(model).eval().requires_grad_(False)]
        self.beta, self.patch, self.gamma, self.kappa, self.focus = beta, patch, gamma, kappa, focus

    aligns = False  # no DINO alignment loss: the SDXL caches skip the DINO CLS features

    @property
    def reference(self) -> nn.Module:
        return self._reference[0]

    def _apply(self, fn, *args, **kwargs):  # .to() / .float() reach the hidden reference too
        self._reference[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def predict(self, model: nn.Module, base, samples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def timesteps(self, samples: Sequence) -> torch.Tensor:
        """Each sample's timestep on the 0..1000 scale (1000 = pure noise)."""
        raise NotImplementedError

    def forward(self, base, pairs: Sequence[PairSample], alpha: float = 0.0, align_weight: float = 0.0) -> dict:
        """Losses of a batch: ``loss`` (focus-weighted Diffusion-DPO), ``margin`` (the implicit preference margin,
        mean over pairs), ``accuracy`` (pairs with margin > 0) and ``diffusion`` (the tuned model's plain denoising
        error, winners and losers). ``alpha`` and ``align_weight`` are the trainer's R^3 schedule: not used."""
        n = len(pairs)
        samples = [p.sample for p in pairs] + [replace(p.sample, latent=p.loser) for p in pairs]
        pred, target = self.predict(self.model, base, samples)
        with torch.no_grad():
            ref, _ = self.predict(self.reference, base, samples)
        e_model = patch_errors(pred, target, self.patch)
        e_ref = patch_errors(ref, target, self.patch)
        if self.focus:
            maps = torch.cat([torch.stack([p.focus[0] for p in pairs]), torch.stack([p.focus[1] for p in pairs])])
            w = focus_weights(maps.to(e_model), self.timesteps(samples), e_model, e_ref, self.gamma, self.kappa)
        else:  # plain Diffusion-DPO: the mean over the latent
            w = torch.ones_like(e_model)
        m, r = weighted_error(e_model, w), weighted_error(e_ref, w)
        loss, margin = dpo_loss(m[:n], r[:n], m[n:], r[n:], self.beta)
        return {"loss": loss.mean(), "diffusion": F.mse_loss(pred.float(), target.float()).detach(),
                "margin": margin.mean().detach(), "accuracy": (margin > 0).float().mean(),
                "eval": loss.mean().detach()}  # the trainer's fixed-batch curve: the DPO loss


class SdxlDpoModule(FocusDpoModule):
    """FocusDPO of an SDXL adapter (MS-Diffusion or R^3): ``model`` is the ``SdxlAdapter``."""

    @property
    def adapter(self) -> nn.Module:
        return self.model

    @staticmethod
    def alpha(adapter: nn.Module) -> float:
        """An R^3 adapter runs at its file's refiner alpha (the R^3 schedule is over: this tunes a trained file)."""
        refiner = getattr(adapter, "refiner", None)
        return float(refiner.alpha) if refiner is not None else 0.0

    def predict(self, model, base: FrozenSdxl, samples):
        pred, target, _ = adapter_prediction(model, base, samples, self.alpha(model))
        return pred, target

    def timesteps(self, samples):
        return torch.tensor([float(s.timestep) for s in samples])  # index into the 1000-step table


class FluxDpoModule(FocusDpoModule):
    """FocusDPO of a DynaIP FLUX adapter: ``model`` is the ``FluxTrainModule`` (adapter and HMoE fusion)."""

    @property
    def adapter(self) -> nn.Module:
        return self.model.adapter

    @property
    def fusion(self) -> nn.Module:
        return self.model.fusion

    def predict(self, model, base, samples):
        return base.predict(samples, TrainingInjection(model.injections(base, samples)))

    def timesteps(self, samples):
        return torch.tensor([1000.0 * float(s.sigma) for s in samples])  # rectified flow: t = 1000 sigma


# --------------------------------------------------------------------------- the method's side of a Trainer


FocusFeatures = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int]]]


def dino_patch_tokens(encoder, resolution: int) -> FocusFeatures:
    """DINO's last-layer patch tokens of IMAGE [N, H, W, 3] (one size), resized as ``encode_dino`` resizes a whole
    image (aspect kept, sides snapped to the patch, the short side near the encoder's side for ``resolution``):
    the focus map's features."""
    from ..models.encoding.dino import image_size, resize

    def run(images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        side = encoder.square_size(resolution)
        if encoder.fixed_size:
            size = (encoder.fixed_size, encoder.fixed_size)
        else:
            size = image_size(images.shape[1], images.shape[2], side, encoder.patch_size)
        tokens = encoder.tokens(resize(images, size))
        return tokens.patches, tokens.grid

    return run


def record_focus(prepared, loser_image: torch.Tensor, features: FocusFeatures, latent_grid: tuple[int, int],
                 strength: float, floor: float) -> torch.Tensor:
    """The focus maps [2, h, w] of a record's winner (its prepared target) and loser image on the latent patch grid."""
    refs = [r[0] for r in prepared.references]  # each subject's first reference
    ref_tokens, ref_grid = zip(*(features(r[None]) for r in refs))
    references = [(t[0], gradient_energy(r, g).flatten()) for t, g, r in zip(ref_tokens, ref_grid, refs)]
    tokens, grid = features(torch.stack([prepared.target, loser_image]))
    boxes = [region.box for region in prepared.layout.regions]
    return torch.stack([to_latent_grid(focus_map(tokens[i], grid, boxes, references, strength, floor), latent_grid)
                        for i in range(2)])


def require_pairs(trainer, c) -> None:
    """Refuse, before any model work, a manifest line without a loser and a run without a starting adapter."""
    from .config import ConfigError

    missing = [r.line for r in trainer.records if r.loser is None]
    if missing:
        raise ConfigError(f"data.manifest: {trainer.config.method.name} trains on preference pairs; line(s) "
                          f'{missing[:8]} have no "loser" (docs/training-data.md, "Preference pairs")')
    if c.initial_adapter is None:
        raise ConfigError(f"method.init_adapter: {trainer.config.method.name} tunes a trained adapter; name the file "
                          "to start from (it is also the frozen reference model of the DPO loss)")


class PairCache:
    """Each pair's loser latent (the store's own VAE cache) and focus maps (``<cache>/focus-<DINO fingerprint>``),
    computed once per record before the first step."""

    def __init__(self, trainer, dino, latent_grid: tuple[int, int]):
        from pathlib import Path

        from .data import DiskCache, module_fingerprint

        cfg = trainer.config
        m = cfg.method
        self.trainer, self.grid = trainer, latent_grid
        self.features = dino_patch_tokens(dino, cfg.data.dino_resolution)
        root = Path(cfg.data.cache_dir or (Path(cfg.train.output_dir) / "cache"))
        self.focus_cache = DiskCache(root, "focus", module_fingerprint(dino.model),
                                     (cfg.data.resolution, cfg.data.dino_resolution, m.focus_patch, m.focus_strength,
                                      m.focus_floor, latent_grid))
        self.pairs: list = [None] * len(trainer.records)

    def _loser_latent(self, record) -> torch.Tensor:
        from .data import prepare

        store, res = self.trainer.store, self.trainer.config.data.resolution
        loser = replace(record, image=record.loser, loser=None)
        return store.caches["latent"].get(loser, lambda: store._latent(prepare(loser, res)))["latent"]

    def _focus(self, record) -> torch.Tensor:
        from .data import prepare

        m, res = self.trainer.config.method, self.trainer.config.data.resolution

        def compute():
            p = prepare(record, res)
            loser = prepare(replace(record, image=record.loser, loser=None), res).target
            return {"focus": record_focus(p, loser, self.features, self.grid, m.focus_strength, m.focus_floor)}

        return self.focus_cache.get(record, compute)["focus"]

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pairs[i] is None:
            record = self.trainer.records[i]
            self.pairs[i] = (self._loser_latent(record), self._focus(record))
        return self.pairs[i]

    def fill(self) -> None:
        def run(step: Callable[[], None]) -> None:
            for i in range(len(self.pairs)):
                self(i)
                step()

        self.trainer.precompute("caching losers and focus maps", run)


def dpo_module(cls, model: nn.Module, m) -> FocusDpoModule:
    return cls(model, beta=m.dpo_beta, patch=m.focus_patch, gamma=m.focus_gamma, kappa=m.confidence_kappa,
               focus=m.focus_strength > 0)


class FocusDpoMethod(SdxlMethod):
    """``Trainer``'s method object for ``focusdpo``: the SDXL set-up of the tuned adapter (``method.init_adapter``,
    required) with its frozen reference copy, the winners' features (the SDXL caches), each loser's VAE latent and
    each pair's focus maps, cached per record."""

    log_keys = ("margin", "accuracy")

    def setup_models(self, trainer, c) -> None:
        from .sdxl import enable_gradient_checkpointing
        from .trainer import comfy_attention, compute_dtype, frozen_base

        require_pairs(trainer, c)
        cfg = trainer.config
        base = frozen_base(trainer, c)
        device = trainer.acc.device
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(base.diffusion_model)
        trainer.frozen = FrozenSdxl(base, device, dtype=compute_dtype(base), attention=comfy_attention())
        adapter = copy.deepcopy(c.initial_adapter).float().train().requires_grad_(True)
        trainer.module = dpo_module(SdxlDpoModule, adapter, cfg.method).to(device)

    def setup_data(self, trainer, c) -> None:
        super().setup_data(trainer, c)
        res = trainer.config.data.resolution
        self.pair = PairCache(trainer, c.dino, token_grid(res // 8, res // 8, trainer.config.method.focus_patch))
        self.pair.fill()

    def sample_at(self, trainer, position: int) -> PairSample:
        """The pair at ``position``: the winner's sample (no image or text dropped: DPO compares conditioned
        predictions), the loser's latent under the same noise and timestep, and the focus maps."""
        from .trainer import record_index

        sample = super().sample_at(trainer, position)
        i = record_index(trainer.config.train.seed, position, len(trainer.records))
        loser, focus = self.pair(i)
        feats = trainer.store.features(i)
        sample = replace(sample, context=feats["context"], pooled=feats["pooled"], drop_image=False)
        return PairSample(sample=sample, loser=loser, focus=focus)

    def save_adapter(self, trainer, path) -> None:
        """The tuned adapter as a ``TroupeLoadAdapter`` file, as the starting file was (refiner alpha kept)."""
        from ..models.sdxl.formats import save_sdxl_adapter

        path.parent.mkdir(parents=True, exist_ok=True)
        save_sdxl_adapter(str(path), trainer.unwrapped().adapter)


class FocusDpoFluxMethod(FluxMethod):
    """``focusdpo-flux``: FocusDPO of a DynaIP FLUX adapter (``troupe-flux``, with its HMoE fusion when the file
    has one beside it), on the FLUX caches; every record is drawn from one stream (no DynaIP stages)."""

    name = "focusdpo-flux"
    log_keys = ("margin", "accuracy")

    def setup_models(self, trainer, c) -> None:
        require_pairs(trainer, c)
        super().setup_models(trainer, c)
        trainer.module = dpo_module(FluxDpoModule, trainer.module, trainer.config.method)

    def check_stages(self, trainer) -> None:
        pass  # one stream of pairs: DynaIP's intra / cross stages do not apply

    def setup_data(self, trainer, c) -> None:
        super().setup_data(trainer, c)
        cfg = trainer.config
        res = cfg.data.resolution
        self.pair = PairCache(trainer, c.dino, token_grid(res // 8, res // 8, cfg.method.focus_patch))
        self.pair.fill()

    def record_at(self, trainer, position: int) -> int:
        from .trainer import record_index

        return record_index(trainer.config.train.seed, position, len(trainer.records))

    def sample_at(self, trainer, position: int) -> PairSample:
        sample = super().sample_at(trainer, position)
        i = self.record_at(trainer, position)
        loser, focus = self.pair(i)
        feats = trainer.store.features(i)
        sample = replace(sample, context=feats["context"], pooled=feats["pooled"], drop_image=False,
                         expert_drop=torch.zeros_like(sample.expert_drop))  # DPO compares whole predictions
        return PairSample(sample=sample, loser=loser, focus=focus)

    def save_adapter(self, trainer, path) -> None:
        save_outputs(trainer.unwrapped().model, path, [int(x) for x in CLIP_LAYERS.split(",")])



def method_for(name: str):
    """The method object of ``focusdpo`` (SDXL) or ``focusdpo-flux``."""
    return FocusDpoFluxMethod() if name == "focusdpo-flux" else FocusDpoMethod()
