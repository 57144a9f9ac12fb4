"""Fuzzing with hypothesis: the layout JSON parser, box -> mask rendering, and the adapter-file reader.

The profile is deterministic (tests/conftest.py registers "troupe-ci": derandomised, fixed example counts), so
CI sees the same cases every run; ``HYPOTHESIS_PROFILE=troupe-explore`` searches further on a developer's machine.
"""
from __future__ import annotations

import json
import pickle
from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from comfyui_troupe.models.adapter_file import AdapterFormatError, read_state_dict
from comfyui_troupe.models.layout.layout import Layout, LayoutError, Region, parse_layout_json, render_box

# --------------------------------------------------------------------------- layout JSON

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=6), max_leaves=40)
COORD = (st.floats(min_value=-0.5, max_value=1.5) | st.integers(-2, 2)
         | st.sampled_from([float("nan"), float("inf"), -float("inf")]))
BOX_ITEM = st.fixed_dictionaries({"x0": COORD, "y0": COORD, "x1": COORD, "y1": COORD},
                                 optional={"label": st.text(max_size=10) | st.integers()})
LAYOUT_LIKE = st.fixed_dictionaries({"boxes": st.lists(BOX_ITEM | st.lists(COORD, max_size=5), max_size=10)},
                                    optional={"version": st.integers(0, 3)})


def _parse_or_refuse(text: str) -> None:
    """The contract: valid boxes come back, anything else is a LayoutError (a ValueError) with a message."""
    try:
        boxes, labels = parse_layout_json(text)
    except LayoutError as e:
        assert str(e), "an empty message tells the user nothing"
        return
    assert len(boxes) == len(labels) <= 8
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


@given(st.text(max_size=300))
def test_any_text_is_parsed_or_refused_with_a_message(text):
    _parse_or_refuse(text)


@given(JSON_VALUES)
def test_any_json_value_is_parsed_or_refused_with_a_message(value):
    _parse_or_refuse(json.dumps(value))


@given(LAYOUT_LIKE)
def test_layout_shaped_json_is_parsed_or_refused_with_a_message(value):
    _parse_or_refuse(json.dumps(value))


@given(st.integers(1, 20_000), st.sampled_from(["[", "{\"a\":", "[{\"boxes\":"]))
@settings(deadline=2000)  # never a hang: deep nesting is refused fast
def test_deep_nesting_is_refused_fast(depth, opener):
    _parse_or_refuse(opener * depth)


# --------------------------------------------------------------------------- box -> mask


def exact_coverage(lo: Fraction, hi: Fraction, n: int) -> list[Fraction]:
    """Exact share of each of n pixels covered by [lo, hi] (fractions of the axis), as rationals."""
    return [max(Fraction(0), min(hi * n, Fraction(i + 1)) - max(lo * n, Fraction(i))) for i in range(n)]


def exact_binary(lo: Fraction, hi: Fraction, n: int) -> list[int]:
    """Binary rule: a pixel is on when it touches the interval (floor of the start, ceil of the end)."""
    return [int(Fraction(i + 1) > lo * n and Fraction(i) < hi * n) for i in range(n)]


SIDE = st.integers(1, 48)
FRACTION = st.fractions(min_value=0, max_value=1, max_denominator=97)


@given(SIDE, SIDE, FRACTION, FRACTION, FRACTION, FRACTION)
def test_box_masks_match_exact_rational_coverage(h, w, a, b, c, d):
    x0, x1 = sorted((a, b))
    y0, y1 = sorted((c, d))
    if x0 == x1 or y0 == y1:
        return
    box = (float(x0), float(y0), float(x1), float(y1))
    cov = render_box(box, h, w, "coverage")
    ys, xs = exact_coverage(y0, y1, h), exact_coverage(x0, x1, w)
    expected = torch.tensor([[float(py * px) for px in xs] for py in ys])
    # the exact rational rounded once to float32 (half an ulp of values <= 1 is 6e-8; products of two roundings)
    torch.testing.assert_close(cov, expected, rtol=0, atol=2e-7)
    binary = render_box(box, h, w, "binary")
    by, bx = exact_binary(y0, y1, h), exact_binary(x0, x1, w)
    assert torch.equal(binary, torch.tensor([[float(p * q) for q in bx] for p in by]))


@given(st.integers(8, 96).map(lambda v: v * 8), st.integers(8, 96).map(lambda v: v * 8),
       st.sampled_from([8, 16, 32, 64]), FRACTION, FRACTION, FRACTION, FRACTION)
def test_latent_masks_at_every_downscale_keep_the_box_area(width, height, factor, a, b, c, d):
    x0, x1 = sorted((a, b))
    y0, y1 = sorted((c, d))
    if x0 == x1 or y0 == y1:
        return
    layout = Layout(width, height, (Region(box=(float(x0), float(y0), float(x1), float(y1))),))
    h, w = -(-height // factor), -(-width // factor)
    mask = layout.masks(h, w, edge="coverage")[0]
    assert mask.shape == (h, w)
    area = float((x1 - x0) * (y1 - y0)) * h * w  # the box's share of the grid, in cells
    assert abs(float(mask.sum()) - area) < 1e-3 * max(1.0, area)


# --------------------------------------------------------------------------- adapter files


@given(st.binary(max_size=512), st.sampled_from([".safetensors", ".bin", ".pt"]))
def test_random_bytes_are_refused_as_adapter_files(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"adapter{suffix}"
    path.write_bytes(data)
    try:
        sd = read_state_dict(str(path))
    except AdapterFormatError as e:
        assert path.name in str(e) and "weights_only=False" not in str(e)
        return
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


@given(st.data())
def test_truncated_adapter_files_are_refused(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("trunc")
    from safetensors.torch import save_file

    tensors = {"image_proj.proj.weight": torch.randn(16, 8), "ip_adapter.1.to_k_ip.weight": torch.randn(8, 4)}
    save_file(tensors, str(folder / "a.safetensors"))
    torch.save({"image_proj": {"w": torch.randn(16, 8)}}, str(folder / "a.bin"))
    with open(folder / "p.bin", "wb") as f:
        pickle.dump({"w": [1, 2, 3]}, f)
    for name in ("a.safetensors", "a.bin", "p.bin"):
        full = (folder / name).read_bytes()
        cut = data.draw(st.integers(0, len(full) - 1), label=f"cut of {name}")
        target = folder / f"cut-{name}"
        target.write_bytes(full[:cut])
        try:
            read_state_dict(str(target))
        except AdapterFormatError as e:
            assert target.name in str(e)
        else:
            raise AssertionError(f"{target.name} cut at {cut} of {len(full)} bytes was read without an error")
