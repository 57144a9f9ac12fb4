"""SDXL adapter files: format detection, sizes read off the tensors, strict key checks, loading and saving.

Key layouts (dotted; a nested ``.bin`` dict ``{"image_proj": {...}, "ms_adapter": {...}}`` reads the same):

    ms-diffusion          image_proj.*  (grounding resampler: latent_proj, latent_norm, grounding_latents,
                                         proj_in, layers.{i}.{0,1}.*, attention_norm, proj_out, norm_out)
                          ms_adapter.{1,3,..,139}.to_k_ip.weight / to_v_ip.weight      [width, 2048]
                          dummy_image_tokens                                            [1, 4, 2048]
    troupe-r3             the ms-diffusion keys + refiner.* (sdxl_refiner) + router.* (sdxl_router)
    ip-adapter-plus-sdxl  image_proj.latents, proj_in, layers.*, proj_out, norm_out; ip_adapter.{idx}.*
    ip-adapter-sdxl       image_proj.proj.weight [T * 2048, P], image_proj.norm.*; ip_adapter.{idx}.*

Sizes are read from the shapes. Head counts are not stored by the published files: the perceiver uses
64-wide heads (MS-Diffusion and IP-Adapter Plus: 20 x 64 = 1280), one head when its width is not a multiple
of 64; the R^3 refiner stores its own sizes (``refiner.heads``, ``window``, ``topk``, ``alpha``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..adapter_file import Adapter, AdapterFamily, AdapterFormatError
from .adapter import JOINT_FORMATS, SdxlAdapter, depths_for, describe_image_input
from .refiner import RefinerConfig
from .resampler import ResamplerConfig

FORMAT_KEYS = {
    "troupe-r3": "image_proj.latent_proj.*, refiner.*, router.*, ms_adapter.*, dummy_image_tokens",
    "ms-diffusion": "image_proj.latent_proj.*, ms_adapter.{idx}.to_k_ip.weight, dummy_image_tokens",
    "ip-adapter-plus-sdxl": "image_proj.latents, ip_adapter.{idx}.to_k_ip.weight",
    "ip-adapter-sdxl": "image_proj.proj.weight, ip_adapter.{idx}.to_k_ip.weight",
}
SDXL_CROSS_DIM = 2048
OTHER_CROSS_DIMS = {768: "SD 1.5", 1024: "SD 2.x"}
HEAD_WIDTH = 64
FORMAT_VERSION = "1"


def _has(sd: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def layer_prefix(fmt: str) -> str:
    return "ms_adapter." if fmt in JOINT_FORMATS else "ip_adapter."


# --------------------------------------------------------------------------- detection


def detect(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The SDXL format a state dict is in, or None when it is not an SDXL adapter file."""
    if _has(sd, "refiner.") or "router.anchor_logits" in sd:
        return "troupe-r3"
    if _has(sd, "ms_adapter.") or "image_proj.latent_proj.0.weight" in sd:
        return "ms-diffusion"
    ip = [k for k in sd if re.fullmatch(r"ip_adapter\.\d+\.to_k_ip\.weight", k)]
    if ip and sd[ip[0]].ndim == 2 and int(sd[ip[0]].shape[1]) in (SDXL_CROSS_DIM, *OTHER_CROSS_DIMS):
        return "ip-adapter-plus-sdxl" if "image_proj.latents" in sd else "ip-adapter-sdxl"
    return None


# --------------------------------------------------------------------------- sizes


def _shape(sd: Mapping[str, torch.Tensor], key: str, fmt: str) -> tuple[int, ...]:
    if key not in sd:
        raise AdapterFormatError(f"{fmt} file: missing key {key} (needed to read the sizes); found "
                                 f"{', '.join(sorted({k.split('.')[0] for k in sd}))}")
    return tuple(int(x) for x in sd[key].shape)


def read_layers(sd: Mapping[str, torch.Tensor], fmt: str) -> tuple[list[int], int]:
    """Per-layer widths in file order and the cross-attention width, checking the odd indices 1, 3, ..."""
    prefix = layer_prefix(fmt)
    found = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.to_k_ip\.weight", k)))
    if not found:
        raise AdapterFormatError(f"{fmt} file: no {prefix}{{idx}}.to_k_ip.weight keys (the per-layer image "
                                 "key/value projections)")
    want = list(range(1, 2 * len(found), 2))
    if found != want:
        raise AdapterFormatError(f"{fmt} file: layer indices {found[:6]}... are not the odd indices 1, 3, ..., "
                                 f"{want[-1]} of SDXL's attention processors")
    widths = [_shape(sd, f"{prefix}{i}.to_k_ip.weight", fmt)[0] for i in found]
    cross = _shape(sd, f"{prefix}1.to_k_ip.weight", fmt)[1]
    if cross != SDXL_CROSS_DIM:
        base = OTHER_CROSS_DIMS.get(cross, f"a model with cross-attention width {cross}")
        raise AdapterFormatError(f"{fmt} file: its layers take width {cross}, so it was made for {base}; SDXL "
                                 f"adapters take {SDXL_CROSS_DIM} (pick the SDXL version of the file)")
    try:
        depths_for(len(found))
    except ValueError as e:
        raise AdapterFormatError(f"{fmt} file: {e}") from None
    return widths, cross


def resampler_config(sd: Mapping[str, torch.Tensor], fmt: str) -> ResamplerConfig:
    """Resampler sizes from the shapes (MS-Diffusion grounding queries, or IP-Adapter Plus learned latents)."""
    p = "image_proj."
    dim, embedding_dim = _shape(sd, p + "proj_in.weight", fmt)
    output_dim = _shape(sd, p + "proj_out.weight", fmt)[0]
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"image_proj\.layers\.(\d+)\.", k))})
    inner = _shape(sd, p + "layers.0.0.to_q.weight", fmt)[0]
    ff_mult = _shape(sd, p + "layers.0.1.1.weight", fmt)[0] // dim
    dim_head = HEAD_WIDTH if inner % HEAD_WIDTH == 0 else inner
    common = {"dim": dim, "depth": depth, "heads": inner // dim_head, "dim_head": dim_head, "embedding_dim": embedding_dim,
                  "output_dim": output_dim, "ff_mult": max(ff_mult, 1)}
    if fmt in JOINT_FORMATS:
        grounding = _shape(sd, p + "latent_proj.0.weight", fmt)[1]
        queries = _shape(sd, p + "latent_proj.2.weight", fmt)[0] // dim
        return ResamplerConfig(**common, num_queries=queries, queries="grounding", phrase_dim=grounding - 8 * 2 * 4,
                               fourier_freqs=8, attention_norm=True)
    queries = _shape(sd, p + "latents", fmt)[1]
    return ResamplerConfig(**common, num_queries=queries, queries="latents", attention_norm=False)


def refiner_config(sd: Mapping[str, torch.Tensor], fmt: str) -> tuple[RefinerConfig, float]:
    """Refiner sizes (width and tokens from ``levels.0.pos``, the rest from its size buffers) and alpha."""
    _, tokens, dim = _shape(sd, "refiner.levels.0.pos", fmt)
    for k in ("refiner.heads", "refiner.window", "refiner.topk", "refiner.alpha"):
        _shape(sd, k, fmt)
    topk = tuple(int(x) for x in sd["refiner.topk"].flatten().tolist())
    if len(topk) != 2:
        raise AdapterFormatError(f"{fmt} file: refiner.topk must hold 2 numbers (levels 2 and 3), got {topk}")
    config = RefinerConfig(dim=dim, tokens=tokens, heads=int(sd["refiner.heads"]), window=int(sd["refiner.window"]),
                           topk=topk)
    return config, float(sd["refiner.alpha"])


# --------------------------------------------------------------------------- key checks


def file_key(module_key: str, fmt: str) -> str:
    """The file name of a module key (``layers.1.to_k_ip.weight`` -> ``ms_adapter.1.to_k_ip.weight``)."""
    return layer_prefix(fmt) + module_key[len("layers."):] if module_key.startswith("layers.") else module_key


def module_key(file_key_: str, fmt: str) -> str:
    prefix = layer_prefix(fmt)
    return "layers." + file_key_[len(prefix):] if file_key_.startswith(prefix) else file_key_


def _listing(keys: list[str], limit: int = 10) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(sd: Mapping[str, torch.Tensor], module: SdxlAdapter) -> None:
    """Raise naming every missing, unexpected or mis-shaped key against what ``module`` expects."""
    fmt = module.format
    want = {file_key(k, fmt): tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {want[k]})" for k in sorted(want)
             if k in sd and tuple(sd[k].shape) != want[k]]
    parts = [f"{label}: {_listing(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if parts:
        raise AdapterFormatError(f"{fmt} file does not match its layout: " + " | ".join(parts))


# --------------------------------------------------------------------------- loading


def build(sd: Mapping[str, torch.Tensor], fmt: str, device=None) -> SdxlAdapter:
    """An empty ``SdxlAdapter`` with the sizes of the file (on ``device``; 'meta' allocates nothing)."""
    widths, cross = read_layers(sd, fmt)
    kw: dict = {"layer_widths": widths, "cross_dim": cross, "device": device}
    if fmt == "ip-adapter-sdxl":
        rows, embedding_dim = _shape(sd, "image_proj.proj.weight", fmt)
        kw["linear"] = (embedding_dim, rows // cross)
    else:
        kw["resampler"] = resampler_config(sd, fmt)
    if fmt == "troupe-r3":
        kw["refiner"], kw["alpha"] = refiner_config(sd, fmt)
    if fmt in JOINT_FORMATS:
        kw["num_dummy_tokens"] = _shape(sd, "dummy_image_tokens", fmt)[1]
    try:
        return SdxlAdapter(fmt, **kw)
    except ValueError as e:
        raise AdapterFormatError(f"{fmt} file: {e}") from None


def load_sdxl(sd: Mapping[str, torch.Tensor], fmt: str) -> Adapter:
    """Build, check every key and shape, and load the weights (no copy: the module holds the file's tensors)."""
    module = build(sd, fmt, device="meta")
    check_keys(sd, module)
    module.load_state_dict({module_key(k, fmt): v for k, v in sd.items()}, strict=True, assign=True)
    # the once-per-run parts compute in float32 whatever the file's dtype (IP-Adapter ships fp16); the
    # per-layer K/V weights stay as stored: the patch casts them once per run on its device
    for part in (module.image_proj, module.refiner, module.router):
        if part is not None:
            part.float()
    if module.dummy_image_tokens is not None:
        module.dummy_image_tokens.data = module.dummy_image_tokens.data.float()
    return Adapter(family="sdxl", format=fmt, module=module.eval(), info=describe(module))


def describe(module: SdxlAdapter) -> dict[str, str]:
    """What the loader found, for the user: semantics, image input, tokens, levels, layers."""
    m = module
    info = {
        "semantics": ("joint (one masked softmax over dummy + all subjects' tokens, MS-Diffusion)"
                      if m.semantics == "joint" else "separate (one masked IP-Adapter attention per subject)"),
        "image input": describe_image_input(m.image_input, m.image_width),
    }
    if m.needs_phrases:
        info["label embedding"] = "CLIP-L pooled output (unprojected), width " \
                                  f"{m.image_proj.config.phrase_dim}, plus each subject's box"
    if m.refiner is not None:
        levels = (f"4 (T_base, T1, T2, T3; refiner alpha {float(m.refiner.alpha):g}, window "
                  f"{m.refiner.config.window}, top-k {m.refiner.config.topk[0]}/{m.refiner.config.topk[1]}; "
                  "learned timestep router)")
    else:
        levels = "1 (no refiner weights: alpha = 0, base level only" + \
                 (", exactly MS-Diffusion)" if m.semantics == "joint" else ")")
    info["levels"] = levels
    info["tokens per subject"] = (f"{m.tokens_per_subject} x {m.num_levels} levels = "
                                  f"{m.tokens_per_subject * m.num_levels}" if m.num_levels > 1
                                  else str(m.tokens_per_subject))
    if m.dummy_tokens is not None:
        info["dummy tokens"] = str(m.dummy_tokens.shape[1])
    widths = sorted(set(m.layer_widths))
    info["cross-attention layers"] = (f"{len(m.layers)} (widths {', '.join(map(str, widths))}; context "
                                      f"{m.cross_dim})")
    info["subjects"] = "any number, up to the layout's 8 (one region each)"
    return info


# --------------------------------------------------------------------------- saving


def file_state_dict(module: SdxlAdapter) -> dict[str, torch.Tensor]:
    """The module's weights under the file's key names (what the training toolkit saves)."""
    return {file_key(k, module.format): v for k, v in module.state_dict().items()}


def save_sdxl_adapter(path: str, module: SdxlAdapter) -> None:
    """Write a .safetensors adapter file with metadata ``format`` and ``version``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in file_state_dict(module).items()}
    save_file(tensors, path, metadata={"format": module.format, "version": FORMAT_VERSION})


FAMILY = AdapterFamily(name="sdxl", formats=FORMAT_KEYS, detect=detect, load=load_sdxl)
