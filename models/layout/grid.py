"""Token grids: how many token rows and columns a latent has at a given downscale (one function for the pack).

ComfyUI pads a latent to whole patches (FLUX, ``pad_to_patch_size``) and the SDXL UNet halves with ceil at
every downsample, so both give ``ceil(latent / factor)`` each way: factor = the patch size for FLUX's
image tokens, 2^level for an SDXL attention layer.
"""
from __future__ import annotations

SDXL_FACTORS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def token_grid(latent_h: int, latent_w: int, factor: int = 2) -> tuple[int, int]:
    """(rows, cols) of the token grid of a ``latent_h x latent_w`` latent: ``ceil(size / factor)`` each way."""
    if factor < 1:
        raise ValueError(f"the downscale factor must be >= 1, got {factor}")
    return -(-latent_h // factor), -(-latent_w // factor)


def grid_of_tokens(tokens: int, latent_h: int, latent_w: int,
                   factors: tuple[int, ...] = SDXL_FACTORS) -> tuple[int, int]:
    """The token grid among ``token_grid(latent_h, latent_w, f)`` for f in ``factors`` that has ``tokens`` tokens."""
    for f in factors:
        h, w = token_grid(latent_h, latent_w, f)
        if h * w == tokens:
            return h, w
    raise ValueError(f"{tokens} attention tokens match no downscale of the {latent_h}x{latent_w} latent")
