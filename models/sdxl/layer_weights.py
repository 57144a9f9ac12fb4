"""Per-layer weights for SDXL adapters, written as ComfyUI_IPAdapter_plus writes them (``layer_weights``).

``"index:weight, index:weight, ..."``: ``index`` numbers the UNet's transformer modules in the order a forward
runs them (ComfyUI's ``transformer_index``): SDXL's input 4, 5, 7, 8 are 0-3, the middle block 4, output 0-5 are
5-10. A listed module gets ``weight`` times the node's weight on all its cross-attention layers; a module that
is not listed gets no image term (as IPAdapter_plus skips it). Empty: every layer at the node's weight.
"""
from __future__ import annotations

LayerKey = tuple[str, int, int]

# (block, id) of SDXL's transformer modules in forward order: ComfyUI's transformer_index 0..10
SDXL_FORWARD_ORDER: tuple[tuple[str, int], ...] = (
    ("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
    ("output", 0), ("output", 1), ("output", 2), ("output", 3), ("output", 4), ("output", 5),
)


def parse_layer_weights(text: str | None) -> dict[int, float] | None:
    """``"0:0.5, 7:1.2"`` -> {0: 0.5, 7: 1.2}; None for an empty string (every layer at weight 1)."""
    text = (text or "").strip()
    if not text:
        return None
    out: dict[int, float] = {}
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        index, sep, weight = item.partition(":")
        try:
            if not sep:
                raise ValueError
            i, w = int(index), float(weight)
        except ValueError:
            raise ValueError(f"layer weights: {item!r} is not 'index:weight' (e.g. '0:0.5, 7:1.2')") from None
        if not 0 <= i < len(SDXL_FORWARD_ORDER):
            raise ValueError(f"layer weights: index {i} does not exist; SDXL's transformer modules are 0-"
                             f"{len(SDXL_FORWARD_ORDER) - 1} (0-3 down, 4 mid, 5-10 up)")
        out[i] = w
    return out


def module_index(key: LayerKey) -> int:
    """The transformer_index of the module holding a cross-attention layer (block, id, block_index)."""
    block, bid = key[0], int(key[1])
    return SDXL_FORWARD_ORDER.index((block, 0 if block == "middle" else bid))


def layer_weight(weights: dict[int, float] | None, key: LayerKey) -> float:
    """The factor on a layer's image term: its module's listed weight, 0 when unlisted, 1 without weights."""
    if weights is None:
        return 1.0
    return float(weights.get(module_index(key), 0.0))
