"""TROUPE_CLIP_FEATURES: per-subject hierarchical CLIP features, their HMoE fusion and granularity overrides."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from .hmoe import HMoE, normalise_weights


@dataclass(frozen=True)
class CropView:
    """What the adapters read, for one crop geometry: penultimate tokens, projected embeds, pooled output."""

    penultimate: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class ClipFeatures:
    """Hierarchical features [N, L, G, D] of N subjects at the 1-based ``layers`` of an encoder.

    With a fusion module, ``routed`` [N, L] holds the router's weights (Eq. 7 of 004), ``weights``
    [N, L] the weights in use (routed, or the artist's override, B.4 of 004) and ``fused`` [N, G, E]
    the fused tokens (Eq. 8 of 004). Fusion does not depend on the timestep, so it runs once here.
    ``depth`` is the encoder's number of blocks (so adapters can ask for e.g. the penultimate layer) and
    ``image_embeds`` [N, P] its projected pooled output (what IP-Adapter base files take), when it has one.
    ``penultimate`` [N, G, D] is layer ``depth - 1`` (what MS-Diffusion and IP-Adapter Plus files take),
    always recorded; ``uncond_penultimate`` [1, G, D] and ``uncond_image_embeds`` [1, P] encode an all-zero
    (normalised) image, the unconditional image prompt of IP-Adapter, from the same batched forward.
    ``crop`` is the geometry of these crops (``clip_features.CROPS``), ``crop_choice`` what the node was asked
    ("as trained" or a geometry), ``crop_views`` the adapters' inputs for further geometries encoded in the same
    forward (``for_crop``). ``pooled`` [N, D] is the encoder's pooled output (SigLIP: its attention-pooling head,
    or the mean token when the file has none; ``pooled_source`` says which) and ``summary`` [N, L, D] what the
    HMoE router reads per level (CLIP: the CLS token; SigLIP, which has none: the pooled output of each level).
    """

    hidden: torch.Tensor
    layers: tuple[int, ...]
    encoder: str
    labels: tuple[str, ...]
    depth: int = 0
    image_embeds: torch.Tensor | None = None
    penultimate: torch.Tensor | None = None
    uncond_penultimate: torch.Tensor | None = None
    uncond_image_embeds: torch.Tensor | None = None
    fusion: HMoE | None = None
    routed: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    fused: torch.Tensor | None = None
    crop: str = "pad"
    crop_choice: str = "pad"
    crop_views: Mapping[str, CropView] = field(default_factory=dict)
    pooled: torch.Tensor | None = None
    pooled_source: str = ""
    summary: torch.Tensor | None = None

    @property
    def num_subjects(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def width(self) -> int:
        return int(self.hidden.shape[-1])

    @property
    def overridden(self) -> bool:
        return self.routed is not None and not torch.equal(self.routed, self.weights)

    def layer(self, k: int) -> torch.Tensor:
        """The full tokens [N, G, D] of 1-based layer ``k`` (negative: from the end, -2 = penultimate)."""
        want = k if k > 0 else self.depth + 1 + k
        if want == self.depth - 1 and want not in self.layers and self.penultimate is not None:
            return self.penultimate
        if want not in self.layers:
            raise ValueError(f"layer {want} of {self.depth} was not encoded (have {', '.join(map(str, self.layers))});"
                             f" set TroupeEncodeSubjects' 'layers' to include {want}")
        return self.hidden[:, self.layers.index(want)]

    def for_crop(self, crop: str) -> ClipFeatures:
        """These features as an adapter trained on ``crop`` reads them: that geometry's view when it was encoded."""
        view = self.crop_views.get(crop)
        if crop == self.crop or view is None:
            return self
        return replace(self, crop=crop, penultimate=view.penultimate, image_embeds=view.image_embeds,
                       pooled=view.pooled)

    def crop_note(self, trained: str) -> str:
        """One line for a node's report: the geometry used for an adapter trained on ``trained``."""
        if self.crop == trained:
            how = "as trained" if self.crop_choice == "as trained" else "chosen, as trained"
            return f"crop: {self.crop} ({how})"
        return (f"crop: {self.crop} (the file was trained with '{trained}'; set TroupeEncodeSubjects' crop to "
                "'as trained' to match)")

    def tokens(self) -> torch.Tensor:
        """The reference tokens an adapter attends to: the fused tokens, else the high layer's tokens."""
        return self.fused if self.fused is not None else self.hidden[:, -1]


def fuse(features: ClipFeatures, fusion: HMoE, override: torch.Tensor | None = None) -> ClipFeatures:
    """Run HMoE on the features once (Eqs. 6-8 of 004), optionally with override weights [1 or N, L]."""
    if len(features.layers) != fusion.config.num_levels:
        raise ValueError(f"the fusion module fuses {fusion.config.num_levels} levels but the features have "
                         f"{len(features.layers)} layers {features.layers}")
    param = next(fusion.parameters())
    hidden = features.hidden.to(device=param.device, dtype=param.dtype)
    summary = None if features.summary is None else features.summary.to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        out = fusion(hidden, override=override, summary=summary)
    return replace(features, fusion=fusion, routed=out.routed_weights.float().cpu(), weights=out.weights.float().cpu(),
                   fused=out.fused.cpu())


def override_weights(features: ClipFeatures, weights: Sequence[float], subject: int = 0) -> ClipFeatures:
    """B.4 of 004: replace the routed weights of one subject (1-based) or of all (0) and fuse again."""
    if features.fusion is None:
        raise ValueError("these features have no fusion module: load fusion weights (TroupeLoadFusion) and pass "
                         "them to TroupeEncodeSubjects first")
    n = features.num_subjects
    if not 0 <= subject <= n:
        raise ValueError(f"subject {subject} does not exist: use 0 for all or 1..{n}")
    chosen = normalise_weights(weights)[0]
    current = features.weights.clone()
    if subject == 0:
        current[:] = chosen
    else:
        current[subject - 1] = chosen
    refused = fuse(features, features.fusion, override=current)
    return replace(refused, routed=features.routed)
