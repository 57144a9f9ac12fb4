"""The SDXL multi-subject adapter as loaded from a file: image projection, refiner, router, per-layer K/V.

One ``SdxlAdapter`` serves four file formats (``formats`` reads them; its ``FAMILY`` plugs them into
``TroupeLoadAdapter``):

- ``troupe-r3``: R^3-Adapter (000): MS-Diffusion's grounding resampler + progressive refiner (Eqs. 1-4) +
  timestep router (Eqs. 5-6), joint masked attention with dummy tokens.
- ``ms-diffusion``: MS-Diffusion's published ``ms_adapter.bin``; no refiner (alpha = 0, base level only).
- ``ip-adapter-plus-sdxl`` / ``ip-adapter-sdxl``: IP-Adapter Plus (perceiver, ViT-H hidden states) and base
  (projected image embeds); separate attention per subject.

Cross-attention layers are numbered as in the files: diffusers processor order (down_blocks.1, down_blocks.2,
up_blocks.0, up_blocks.1, mid_block), attn2 at odd indices 1, 3, ..., 139 for full-size SDXL; ``layer_keys``
maps them to ComfyUI's (block, id, block_index).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .refiner import ProgressiveRefiner, RefinerConfig
from .resampler import ImageProjLinear, Resampler, ResamplerConfig
from .router import Schedule, TimestepRouter, route

FORMATS = ("troupe-r3", "ms-diffusion", "ip-adapter-plus-sdxl", "ip-adapter-sdxl")
JOINT_FORMATS = ("troupe-r3", "ms-diffusion")
# the reference crop each format's training made (clip_features.CROPS): MS-Diffusion resizes references to a
# square (R^3 files continue its training); IP-Adapter uses CLIPImageProcessor (short side, centre crop)
TRAINED_CROP = {"troupe-r3": "stretch", "ms-diffusion": "stretch", "ip-adapter-plus-sdxl": "centre crop",
                "ip-adapter-sdxl": "centre crop"}

# ComfyUI's SDXL transformer modules in the files' (diffusers) order, with their full-size depths.
SDXL_MODULES: tuple[tuple[str, int], ...] = (
    ("input", 4), ("input", 5), ("input", 7), ("input", 8),
    ("output", 0), ("output", 1), ("output", 2), ("output", 3), ("output", 4), ("output", 5),
    ("middle", 0),
)
SDXL_DEPTHS: tuple[int, ...] = (2, 2, 10, 10, 10, 10, 10, 2, 2, 2, 10)
LayerKey = tuple[str, int, int]


def sdxl_layer_keys(depths: Sequence[int] = SDXL_DEPTHS) -> list[LayerKey]:
    """ComfyUI attn2 locations (block, id, block_index) in file order for the transformer depth of each module."""
    if len(depths) != len(SDXL_MODULES):
        raise ValueError(f"need one depth per SDXL transformer module ({len(SDXL_MODULES)}), got {len(depths)}")
    return [(block, bid, i) for (block, bid), d in zip(SDXL_MODULES, depths) for i in range(int(d))]


def depths_for(num_layers: int) -> tuple[int, ...]:
    """The module depths a file with ``num_layers`` attn2 layers was made for: full SDXL (70) or one block each (11)."""
    if num_layers == sum(SDXL_DEPTHS):
        return SDXL_DEPTHS
    if num_layers == len(SDXL_MODULES):
        return (1,) * len(SDXL_MODULES)
    raise ValueError(f"the adapter has {num_layers} cross-attention layers; SDXL has {sum(SDXL_DEPTHS)} (one per "
                     f"transformer block) and the one-block-per-module test UNet {len(SDXL_MODULES)}; pass the "
                     "transformer depths of your UNet's 11 modules")


class KVProjection(nn.Module):
    """One cross-attention layer's image key/value projections ``to_k_ip``, ``to_v_ip`` (no bias)."""

    def __init__(self, cross_dim: int, width: int, *, operations=nn, dtype=None, device=None):
        super().__init__()
        self.to_k_ip = operations.Linear(cross_dim, width, bias=False, dtype=dtype, device=device)
        self.to_v_ip = operations.Linear(cross_dim, width, bias=False, dtype=dtype, device=device)


class SdxlAdapter(nn.Module):
    """A loaded SDXL adapter (see the module docstring); built by ``formats.load_sdxl``.

    ``layers`` holds one ``KVProjection`` per file layer, named by its file index ("1", "3", ...).
    """

    def __init__(self, format: str, *, layer_widths: Sequence[int], cross_dim: int = 2048,
                 resampler: ResamplerConfig | None = None, linear: tuple[int, int] | None = None,
                 refiner: RefinerConfig | None = None, alpha: float = 1.0, num_dummy_tokens: int = 4,
                 operations=nn, dtype=None, device=None):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown SDXL adapter format {format!r}; known: {', '.join(FORMATS)}")
        if (resampler is None) == (linear is None):
            raise ValueError("give exactly one image projection: a resampler config or (embedding_dim, tokens)")
        kw = {"dtype": dtype, "device": device}
        self.format = format
        self.semantics = "joint" if format in JOINT_FORMATS else "separate"
        self.trained_crop = TRAINED_CROP[format]
        self.cross_dim = int(cross_dim)
        if resampler is not None:
            if resampler.output_dim != cross_dim:
                raise ValueError(f"the resampler outputs width {resampler.output_dim}, the layers take {cross_dim}")
            self.image_proj = Resampler(resampler, operations=operations, **kw)
            self.tokens_per_subject = resampler.num_queries
            self.image_input = "penultimate"
            self.image_width = resampler.embedding_dim
            self.needs_phrases = resampler.queries == "grounding"
        else:
            embedding_dim, tokens = linear
            self.image_proj = ImageProjLinear(embedding_dim, cross_dim, tokens, operations=operations, **kw)
            self.tokens_per_subject = tokens
            self.image_input = "image_embeds"
            self.image_width = embedding_dim
            self.needs_phrases = False
        if refiner is not None and (refiner.dim, refiner.tokens) != (self.cross_dim, self.tokens_per_subject):
            raise ValueError(f"the refiner takes [{refiner.tokens}, {refiner.dim}] tokens per subject but the image "
                             f"projection gives [{self.tokens_per_subject}, {self.cross_dim}]")
        self.refiner = ProgressiveRefiner(refiner, alpha, operations=operations, **kw) if refiner is not None else None
        self.router = TimestepRouter(4, **kw) if refiner is not None else None
        self.num_levels = 4 if refiner is not None else 1
        self.layers = nn.ModuleDict({str(2 * i + 1): KVProjection(cross_dim, w, operations=operations, **kw)
                                     for i, w in enumerate(layer_widths)})
        self.dummy_image_tokens = (nn.Parameter(torch.zeros(1, num_dummy_tokens, cross_dim, **kw))
                                   if self.semantics == "joint" else None)

    # ----------------------------------------------------------------- what the patch asks

    @property
    def dummy_tokens(self) -> torch.Tensor | None:
        """[1, 4, cross_dim]: what background pixels attend to in joint semantics; None in separate."""
        return self.dummy_image_tokens

    @property
    def layer_widths(self) -> list[int]:
        return [int(m.to_k_ip.weight.shape[0]) for m in self.layers.values()]

    def layer_keys(self, depths: Sequence[int] | None = None) -> list[LayerKey]:
        """ComfyUI attn2 locations (block, id, block_index) of the file's layers, in file order."""
        return sdxl_layer_keys(depths if depths is not None else depths_for(len(self.layers)))

    def kv(self, key: LayerKey, depths: Sequence[int] | None = None) -> tuple[nn.Module, nn.Module]:
        """(to_k_ip, to_v_ip) of the layer at ComfyUI location ``key`` = (block, id, block_index)."""
        keys = self.layer_keys(depths)
        try:
            i = keys.index(tuple(key))
        except ValueError:
            raise KeyError(f"no adapter layer at {key}; this file has {len(keys)} layers at "
                           f"{', '.join(sorted({f'{b} {n}' for b, n, _ in keys}))}") from None
        layer = self.layers[str(2 * i + 1)]
        return layer.to_k_ip, layer.to_v_ip

    def subject_tokens(self, image_features: torch.Tensor, boxes: torch.Tensor | None = None,
                       phrases: torch.Tensor | None = None, *, refine: bool = True,
                       alpha: float | None = None) -> torch.Tensor:
        """Levels of every subject's tokens [N, L, T, cross_dim] (Sec. 3.1-3.2 of 000).

        ``image_features``: [N, G, E] penultimate hidden states, or [N, P] projected embeds (``image_input``);
        ``boxes`` [N, 4] normalised x0, y0, x1, y1 and ``phrases`` [N, 768] (CLIP-L unprojected pooled output)
        for the grounding resampler. With refiner weights and ``refine`` L = 4 ([T_base; T1; T2; T3]), else
        L = 1 (alpha = 0: MS-Diffusion). ``alpha`` overrides the file's warmup coefficient.
        """
        self.check_image_features(image_features)
        param = next(self.image_proj.parameters())
        image_features = image_features.to(device=param.device, dtype=param.dtype)
        boxes = None if boxes is None else boxes.to(device=param.device, dtype=param.dtype)
        phrases = None if phrases is None else phrases.to(device=param.device, dtype=param.dtype)
        if self.image_input == "penultimate":
            if self.needs_phrases and (boxes is None or phrases is None):
                raise ValueError("the grounding resampler needs each subject's box and label embedding")
            base = self.image_proj(image_features, boxes, phrases) if self.needs_phrases \
                else self.image_proj(image_features)
        else:
            base = self.image_proj(image_features)
        if self.refiner is None or not refine:
            return base[:, None]
        return self.refiner(base, alpha=alpha)

    def levels(self, refine: bool = True) -> int:
        """How many token levels ``subject_tokens`` returns with this refine setting."""
        return self.num_levels if refine else 1

    def route(self, t: float, mode: str = "learned", schedule: str | Schedule | None = None, *,
              refine: bool = True) -> torch.Tensor:
        """Gate weights [levels] at t = timestep / 1000 (Eqs. 5-6 of 000; see ``sdxl_router.route``)."""
        return route(t, self.levels(refine), mode, self.router, schedule)

    def check_image_features(self, x: torch.Tensor) -> None:
        """Clear error when the encoded features are not what the image projection takes."""
        hidden = self.image_input == "penultimate"
        want = f"[N, G, {self.image_width}]" if hidden else f"[N, {self.image_width}]"
        if x.ndim != (3 if hidden else 2) or x.shape[-1] != self.image_width:
            what = describe_image_input(self.image_input, self.image_width)
            raise ValueError(f"this {self.format} adapter takes {what} {want}, got {tuple(x.shape)}; encode the "
                             "subjects with the matching CLIP vision model")

    def image_features(self, features) -> torch.Tensor:
        """Pick what the image projection takes from ``ClipFeatures``: the penultimate layer or the image embeds."""
        if self.image_input == "image_embeds":
            if features.image_embeds is None:
                raise ValueError(f"this {self.format} adapter takes projected image embeds (width {self.image_width}) "
                                 "but the CLIP vision model gave none; use a CLIP vision model with a projection")
            x = features.image_embeds
        else:
            x = features.layer(-2)
        self.check_image_features(x)
        return x


def describe_image_input(kind: str, width: int) -> str:
    """Human words for the image input a projection takes, naming the usual encoder."""
    if kind == "penultimate":
        enc = {1664: "CLIP ViT-bigG/14", 1280: "CLIP ViT-H/14", 1024: "CLIP ViT-L/14"}.get(width, "CLIP vision")
        return f"{enc} penultimate hidden states (width {width})"
    enc = {1280: "CLIP ViT-bigG/14", 1024: "CLIP ViT-H/14", 768: "CLIP ViT-L/14"}.get(width, "CLIP vision")
    return f"{enc} projected image embeds (width {width})"
