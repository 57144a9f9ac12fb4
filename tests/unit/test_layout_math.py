"""Layout maths: box -> mask at any resolution, overlaps, feather, and the JSON value's validation.

Each expected mask is computed independently (pixel by pixel with fractions, not with the
module's own vectorised code) so a wrong edge rule fails here.
"""
from fractions import Fraction

import numpy as np
import pytest
import torch

from comfyui_troupe.models.layout.layout import (
    Layout,
    LayoutError,
    Region,
    dump_layout_json,
    layout_from_json,
    layout_from_masks,
    mask_bbox,
    parse_layout_json,
    render_box,
)


def reference_coverage(box, height, width):
    """Exact area of each pixel inside the box, with rational arithmetic, one pixel at a time."""
    x0, y0, x1, y1 = (Fraction(v).limit_denominator(10**9) for v in box)
    out = torch.zeros(height, width, dtype=torch.float64)
    for r in range(height):
        top, bottom = Fraction(r, height), Fraction(r + 1, height)
        dy = max(Fraction(0), min(bottom, y1) - max(top, y0)) * height
        for c in range(width):
            left, right = Fraction(c, width), Fraction(c + 1, width)
            dx = max(Fraction(0), min(right, x1) - max(left, x0)) * width
            out[r, c] = float(dx * dy)
    return out.float()


# A box whose edges fall inside pixels on every side at these sizes, an aligned one, and a full one.
BOXES = [(0.13, 0.27, 0.61, 0.94), (0.25, 0.5, 0.75, 1.0), (0.0, 0.0, 1.0, 1.0), (0.333, 0.1, 0.334, 0.9)]
SIZES = [(8, 8), (7, 13), (64, 48), (33, 17), (1, 1)]


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("size", SIZES)
def test_coverage_is_exact_pixel_area(box, size):
    h, w = size
    got = render_box(box, h, w, "coverage")
    want = reference_coverage(box, h, w)
    assert got.shape == (h, w)
    assert torch.allclose(got, want, atol=1e-5)
    # the mask's mass is the box area in pixels
    area = (box[2] - box[0]) * (box[3] - box[1]) * h * w
    assert got.sum().item() == pytest.approx(area, rel=1e-4, abs=1e-4)


def test_edge_pixels_hold_fractions_on_a_non_square_canvas():
    # canvas 10 wide, 4 high: x0 = 0.15 -> 1.5 px, so column 1 is half covered; y1 = 0.625 -> 2.5 px
    m = render_box((0.15, 0.0, 0.5, 0.625), 4, 10, "coverage")
    assert m[0, 0] == 0 and m[0, 1] == pytest.approx(0.5) and m[0, 2] == 1 and m[0, 4] == 1 and m[0, 5] == 0
    assert m[2, 2] == pytest.approx(0.5) and m[3, 2] == 0


def test_binary_uses_floor_start_and_ceil_end():
    # MS-Diffusion's latent rule: any touched pixel is on. 0.13*64 = 8.32 -> 8, 0.61*64 = 39.04 -> 40
    m = render_box((0.13, 0.27, 0.61, 0.94), 64, 64, "binary")
    cols = torch.nonzero(m.any(0)).flatten()
    rows = torch.nonzero(m.any(1)).flatten()
    assert (cols[0].item(), cols[-1].item() + 1) == (8, 40)
    assert (rows[0].item(), rows[-1].item() + 1) == (17, 61)  # 0.27*64 = 17.28, 0.94*64 = 60.16
    assert set(m.unique().tolist()) == {0.0, 1.0}


def test_binary_keeps_aligned_edges_tight():
    # an edge exactly on a pixel boundary must not grow by a pixel
    m = render_box((0.25, 0.5, 0.75, 1.0), 8, 8, "binary")
    assert m.sum().item() == 4 * 4
    assert m[4:, 2:6].all()


def test_center_rule():
    m = render_box((0.13, 0.27, 0.61, 0.94), 10, 10, "center")
    # centres 0.5..9.5 px; x in [1.3, 6.1) -> columns 1..5; y in [2.7, 9.4) -> rows 3..8
    assert torch.nonzero(m.any(0)).flatten().tolist() == [1, 2, 3, 4, 5]
    assert torch.nonzero(m.any(1)).flatten().tolist() == [3, 4, 5, 6, 7, 8]


def test_latent_and_attention_resolutions():
    layout = layout_from_json(dump_layout_json([(0.0, 0.0, 0.5, 1.0), (0.5, 0.25, 1.0, 0.75)]), 1016, 768)
    lat = layout.latent_masks(8)
    assert lat.shape == (2, 96, 127)  # ceil(1016 / 8) = 127
    att = layout.attention_masks(96, 127, factors=(1, 2, 4))
    assert att[1].shape == (2, 96 * 127)
    assert att[2].shape == (2, 48 * 64)
    assert att[4].shape == (2, 24 * 32)
    # a token grid row-major flatten: token (r, c) is r * w + c
    m4 = layout.masks(24, 32)
    assert torch.equal(att[4][1].view(24, 32), m4[1])


def test_overlap_policies():
    boxes = [(0.0, 0.0, 0.75, 1.0), (0.5, 0.0, 1.0, 1.0)]
    layout = Layout(64, 64, tuple(Region(box=b) for b in boxes))
    share = layout.masks(4, 4, overlap="share")
    assert share[0, 0].tolist() == [1, 1, 1, 0] and share[1, 0].tolist() == [0, 0, 1, 1]
    front = layout.masks(4, 4, overlap="front")
    assert front[0, 0].tolist() == [1, 1, 0, 0] and front[1, 0].tolist() == [0, 0, 1, 1]
    norm = layout.masks(4, 4, overlap="normalize")
    assert norm[0, 0].tolist() == [1, 1, 0.5, 0] and norm[1, 0].tolist() == [0, 0, 0.5, 1]
    assert (norm.sum(0) <= 1 + 1e-6).all()


def test_front_policy_with_fractional_masks_never_exceeds_one():
    layout = Layout(64, 64, (Region(box=(0.1, 0.1, 0.6, 0.6)), Region(box=(0.33, 0.33, 0.9, 0.9))))
    m = layout.masks(7, 9, overlap="front")
    assert (m.sum(0) <= 1 + 1e-6).all()
    # the later region is untouched by the earlier one
    assert torch.allclose(m[1], render_box((0.33, 0.33, 0.9, 0.9), 7, 9))


def sampled_gaussian_blur_1d(row, sigma):
    """Independent 1-D blur: numpy convolution with a normalised Gaussian sampled to 3 sigma, zero padded."""
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return np.convolve(row, k / k.sum(), mode="same")


@pytest.mark.parametrize("size,sigma_px", [(64, 2.0), (16, 0.5), (37, 37 / 256 * 8.0)])
def test_feather_is_a_gaussian_with_sigma_in_canvas_pixels(size, sigma_px):
    layout = Layout(256, 256, (Region(box=(0.25, 0.25, 0.75, 0.75)),))
    hard = layout.masks(size, size)
    soft = layout.masks(size, size, feather=8.0)  # sigma 8 canvas px, scaled to the mask size
    assert torch.equal(layout.masks(size, size, feather=0.0), hard)
    assert soft.max() <= 1 and soft.min() >= 0
    # separable: the blur of the outer product is the outer product of the 1-D blurs
    along_x = sampled_gaussian_blur_1d(hard[0].max(0).values.double().numpy(), sigma_px)
    along_y = sampled_gaussian_blur_1d(hard[0].max(1).values.double().numpy(), sigma_px)
    want = np.outer(along_y, along_x)
    assert np.allclose(soft[0].numpy(), np.clip(want, 0, 1), atol=1e-5)
    assert soft.sum().item() == pytest.approx(hard.sum().item(), rel=1e-3)  # mass kept away from borders


def test_mask_regions_and_bbox():
    masks = torch.zeros(2, 40, 60)
    masks[0, 10:20, 5:15] = 1
    masks[1, 0:40, 30:60] = 1
    masks[1, 0:5, 30:35] = 0  # a notch: the bbox is still the full rectangle
    layout = layout_from_masks(masks)
    assert (layout.width, layout.height) == (60, 40)
    assert layout.boxes[0] == pytest.approx((5 / 60, 10 / 40, 15 / 60, 20 / 40))
    assert layout.boxes[1] == pytest.approx((0.5, 0.0, 1.0, 1.0))
    full = layout.masks(40, 60)
    assert torch.equal(full, masks)  # mask regions render exactly at their own size
    half = layout.masks(20, 30)
    # half-size pixels average 2x2 source pixels: the notch (rows 0-4, cols 30-34) gives 0, 1/2 and 3/4
    assert half[1, 1, 15].item() == 0.0 and half[1, 2, 15].item() == 0.5 and half[1, 2, 17].item() == 0.75
    with pytest.raises(LayoutError, match="mask 1 of the batch is empty"):
        layout_from_masks(torch.zeros(1, 8, 8))
    with pytest.raises(LayoutError, match=r"MASK batch \[N, H, W\]"):
        layout_from_masks(torch.zeros(1, 1, 8, 8))
    assert mask_bbox(masks[0]) == pytest.approx((5 / 60, 0.25, 0.25, 0.5))


def test_json_round_trip():
    text = '{"version": 1, "boxes": [{"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9, "label": "corgi"}, [0, 0, 1, 1]]}'
    boxes, labels = parse_layout_json(text)
    assert boxes == [(0.1, 0.2, 0.5, 0.9), (0.0, 0.0, 1.0, 1.0)] and labels == ["corgi", ""]
    assert parse_layout_json(dump_layout_json(boxes, labels)) == (boxes, labels)
    layout = layout_from_json(text, 512, 768)
    assert (layout.width, layout.height, len(layout)) == (512, 768, 2)
    assert layout.regions[0].label == "corgi"


BAD_JSON = [
    ("", "empty"),
    ("{not json", "not valid JSON"),
    ("[]", 'must be a JSON object with a "boxes" list'),
    ('{"version": 2, "boxes": []}', "unsupported layout version 2"),
    ('{"boxes": {"x0": 0}}', '"boxes" must be a list'),
    ('{"boxes": [{"x0": 0.1, "y0": 0.1, "x1": 0.5}]}', "box 1: missing y1"),
    ('{"boxes": [{"x0": 0.1, "y0": 0.1, "x1": 1.5, "y1": 0.5}]}', r"box 1: x1=1.5 is out of range"),
    ('{"boxes": [{"x0": -0.1, "y0": 0.1, "x1": 0.5, "y1": 0.5}]}', r"x0=-0.1 is out of range"),
    ('{"boxes": [{"x0": 0.5, "y0": 0.1, "x1": 0.5, "y1": 0.5}]}', "zero or negative area"),
    ('{"boxes": [{"x0": 0.1, "y0": 0.6, "x1": 0.5, "y1": 0.5}]}', "zero or negative area"),
    ('{"boxes": [{"x0": "a", "y0": 0.1, "x1": 0.5, "y1": 0.5}]}', "x0 must be a finite number"),
    ('{"boxes": [{"x0": true, "y0": 0.1, "x1": 0.5, "y1": 0.5}]}', "x0 must be a finite number"),
    ('{"boxes": [{"x0": NaN, "y0": 0.1, "x1": 0.5, "y1": 0.5}]}', "x0 must be a finite number"),
    ('{"boxes": [[0.1, 0.2, 0.3]]}', "expected 4 numbers"),
    ('{"boxes": [7]}', "box 1: expected an object"),
    ('{"boxes": [{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "label": 3}]}', "label must be a string"),
    ('{"boxes": [' + ",".join(['[0,0,1,1]'] * 9) + "]}", "at most 8 boxes"),
    ("[" * 5000 + "]" * 5000, "nests lists or objects too deeply"),  # json.loads raises RecursionError
    ('{"boxes": [], "pad": "' + "x" * 200_000 + '"}', "the boxes value has 200024 characters"),
]


@pytest.mark.parametrize("text,message", BAD_JSON)
def test_bad_json_gives_a_clear_error(text, message):
    with pytest.raises(LayoutError, match=message):
        parse_layout_json(text)


def test_stored_edges_snap_to_canvas_pixels():
    """72 px of 1024 is stored as 0.070313 (72.0005 px): parsed back onto 72 px, the binary rule keeps 9 rows."""
    text = '{"version": 1, "boxes": [{"x0": 0, "y0": 0, "x1": 0.070313, "y1": 0.195313}]}'  # as the editor's round6
    box = layout_from_json(text, 1024, 1024).regions[0].box
    assert box == (0.0, 0.0, 72 / 1024, 200 / 1024)
    rows = layout_from_json(text, 1024, 1024).masks(128, 128, edge="binary")[0].sum(0).count_nonzero()
    assert rows == 9  # x1 = 72 px = latent column 9 exactly; 72.0005 px would ceil to 10
    # a genuinely sub-pixel edge (half a pixel) is kept as it is
    half = layout_from_json(dump_layout_json([(0.0, 0.0, 72.5 / 1024, 0.5)]), 1024, 1024).regions[0].box
    assert half[2] == pytest.approx(72.5 / 1024, abs=1e-6)


def test_bad_layouts():
    with pytest.raises(LayoutError, match="width must be an integer >= 8"):
        Layout(0, 64, ())
    with pytest.raises(LayoutError, match="needs a box or a mask"):
        Region()
    with pytest.raises(LayoutError, match="at most 8 regions"):
        Layout(64, 64, tuple(Region(box=(0, 0, 1, 1)) for _ in range(9)))
    with pytest.raises(LayoutError, match="overlap policy must be one of"):
        Layout(64, 64, (Region(box=(0, 0, 1, 1)),)).masks(4, 4, overlap="max")
