"""TROUPE_SUBJECT validation and the layout preview picture, on real MS-Bench photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_troupe.models.layout.layout import PALETTE, Layout, Region
from comfyui_troupe.models.layout.preview import box_pixels, draw_layout, draw_masks, hex_rgb
from comfyui_troupe.models.layout.subject import Subject, SubjectError, subject_list


def load_image(path) -> torch.Tensor:
    """A photo as a ComfyUI IMAGE [1, H, W, 3] in [0, 1], as LoadImage gives it."""
    arr = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(arr)[None]


@pytest.fixture(scope="module")
def dog(msbench):
    return load_image(msbench / "images" / "living" / "dog.jpg")


def test_subject_keeps_its_fields(dog):
    s = Subject(image=dog, label="  corgi ", weight=0.7)
    assert s.label == "corgi" and s.weight == 0.7 and s.num_images == 1
    assert s.masks().shape == dog.shape[:3] and bool((s.masks() == 1).all())
    mask = torch.zeros(dog.shape[1:3])
    mask[10:50, 20:80] = 1
    m = Subject(image=dog, label="dog", mask=mask)
    assert m.mask.shape == (1, *dog.shape[1:3])
    assert m.masks().sum().item() == 40 * 60


def test_subject_drops_alpha_and_broadcasts_a_single_mask(dog):
    rgba = torch.cat([dog, torch.ones_like(dog[..., :1])], -1).repeat(2, 1, 1, 1)
    s = Subject(image=rgba, label="dog", mask=torch.ones(1, *dog.shape[1:3]))
    assert s.image.shape[-1] == 3 and s.masks().shape[0] == 2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"label": ""}, "label: give the word"),
        ({"label": "dog", "weight": -1.0}, r"weight: expected a number in \[0, 10\]"),
        ({"label": "dog", "mask": torch.ones(1, 7, 7)}, "mask: expected a MASK of the image's size"),
        ({"label": "dog", "image": torch.ones(8, 8, 3)}, r"image: expected an IMAGE batch \[B, H, W, 3\]"),
        ({"label": "dog " * 100_000}, r"label: 399999 characters; .* \(at most 200\)"),  # held the queue 12-27 s
    ],
)
def test_bad_subjects(dog, kwargs, message):
    kwargs.setdefault("image", dog)
    with pytest.raises(SubjectError, match=message):
        Subject(**kwargs)


def test_subject_list_keeps_slot_order(dog):
    a, b = Subject(image=dog, label="a"), Subject(image=dog, label="b")
    assert [s.label for s in subject_list([None, b, None, a])] == ["b", "a"]
    with pytest.raises(SubjectError, match="connect at least one subject"):
        subject_list([None, None])
    with pytest.raises(SubjectError, match="at most 8 subjects"):
        subject_list([a] * 9)


def test_preview_draws_outlines_at_the_box_pixels():
    layout = Layout(320, 200, (Region(box=(0.1, 0.2, 0.5, 0.9), label="dog"), Region(box=(0.55, 0.05, 0.95, 0.5))))
    img = draw_layout(layout, line_width=3)
    assert img.shape == (1, 200, 320, 3)
    arr = (img[0].numpy() * 255).round().astype(int)
    for i, region in enumerate(layout.regions):
        left, top, right, bottom = box_pixels(region.box, 320, 200)
        colour = np.array(hex_rgb(PALETTE[i]))
        mid_y, mid_x = (top + bottom) // 2, (left + right) // 2
        assert (arr[mid_y, left] == colour).all() and (arr[mid_y, right] == colour).all()
        assert (arr[bottom, mid_x] == colour).all()
        assert not (arr[mid_y, left - 1] == colour).all()  # the outline starts at the box edge
        assert not (arr[mid_y, right + 1] == colour).all()
    assert (arr[199, 0] == round(0.12 * 255)).all()  # blank canvas outside


def test_preview_over_a_photo_resizes_it_to_the_canvas(dog):
    layout = Layout(256, 256, (Region(box=(0.25, 0.25, 0.75, 0.75)),))
    img = draw_layout(layout, dog)
    assert img.shape == (1, 256, 256, 3)
    ref = Image.fromarray((dog[0].numpy() * 255).round().astype(np.uint8)).resize((256, 256), Image.Resampling.LANCZOS)
    # outside the box the picture is the photo itself
    assert np.abs(np.asarray(ref)[5, 5].astype(int) - (img[0, 5, 5].numpy() * 255).round()).max() <= 1


def test_mask_preview_tints_each_region():
    masks = torch.zeros(2, 4, 4)
    masks[0, :, :2] = 1
    masks[1, :, 2:] = 0.5
    img = draw_masks(masks)[0]
    assert torch.allclose(img[0, 0] * 255, torch.tensor(hex_rgb(PALETTE[0]), dtype=torch.float32))
    assert torch.allclose(img[0, 3] * 255, 0.5 * torch.tensor(hex_rgb(PALETTE[1]), dtype=torch.float32))


def test_thumbnails_sit_inside_their_boxes(dog):
    layout = Layout(400, 200, (Region(box=(0.0, 0.0, 0.5, 1.0)), Region(box=(0.5, 0.0, 1.0, 1.0))))
    white = torch.ones(1, 50, 100, 3)
    img = draw_layout(layout, thumbnails=[dog, white], fill_alpha=0.0, thumbnail_alpha=1.0, line_width=2)[0]
    # the white 2:1 reference is fitted into the 200x200 box 2: 200 x 100, centred vertically
    assert torch.allclose(img[100, 300], torch.ones(3))
    assert img[20, 300].max() < 0.2  # above the contained thumbnail: the blank canvas
    assert img[100, 100].std() >= 0 and not torch.allclose(img[100, 100], torch.full((3,), 0.12), atol=0.01)
