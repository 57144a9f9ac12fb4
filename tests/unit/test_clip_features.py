"""Subject crops and layer recording for hierarchical CLIP features (Sec. 4.2, B.8 of 004)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_troupe.models.encoding.clip_features import (
    check_layers,
    default_layers,
    record_layers,
    stack_levels,
    subject_batch,
    subject_crop,
)


@pytest.mark.parametrize("depth,layers", [(24, (10, 17, 24)), (32, (13, 23, 32)), (48, (20, 34, 48)),
                                          (27, (11, 19, 27)), (12, (5, 8, 12))])
def test_default_layers_scale_dynaip_by_depth(depth, layers):
    assert default_layers(depth) == layers


def test_layer_indices_are_checked():
    assert check_layers((1, 12, 24), 24) == (1, 12, 24)
    with pytest.raises(ValueError, match="layer 25 does not exist; this encoder has layers 1..24"):
        check_layers((10, 17, 25), 24)
    with pytest.raises(ValueError, match="layer 0 does not exist"):
        check_layers((0, 17, 24), 24)


def test_crop_blanks_the_background_and_pads_without_stretching():
    img = torch.rand(40, 100, 3)
    mask = torch.zeros(40, 100)
    mask[5:35, 20:40] = 1  # a 30 x 20 subject
    mask[10, 25] = 0  # a hole inside the subject is background too
    out = subject_crop(img, mask)
    assert out.shape == (30, 30, 3)
    # the subject keeps its pixels, centred horizontally (5 px of white each side)
    assert torch.equal(out[:, 5:25], torch.where(mask[5:35, 20:40, None] > 0, img[5:35, 20:40], torch.ones(1)))
    assert (out[:, :5] == 1).all() and (out[:, 25:] == 1).all()
    assert (out[5, 10] == 1).all()  # the hole
    # without a mask the whole photo is padded to a square, aspect kept
    full = subject_crop(img)
    assert full.shape == (100, 100, 3) and torch.equal(full[30:70], img) and (full[:30] == 1).all()
    with pytest.raises(ValueError, match="subject mask is empty"):
        subject_crop(img, torch.zeros(40, 100))


def test_subject_batch_is_one_square_batch():
    imgs = [torch.rand(40, 60, 3), torch.rand(90, 30, 3)]
    batch = subject_batch(imgs, [None, None], 32)
    assert batch.shape == (2, 32, 32, 3)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


def test_recorded_layers_are_the_hidden_states_after_each_block():
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(8) for _ in range(6))
    x = torch.randn(2, 5, 8)
    every, h = [], x
    for b in blocks:  # independent forward that keeps every layer
        h = b(h)
        every.append(h)
    with record_layers(blocks, (2, 4, 6)) as store:
        y = x
        for b in blocks:
            y = b(y)
    feats = stack_levels(store, (2, 4, 6))
    assert feats.shape == (2, 3, 5, 8)
    assert torch.equal(feats[:, 0], every[1]) and torch.equal(feats[:, 2], every[5])
    assert not blocks[1]._forward_hooks  # hooks are removed afterwards


class InPlaceBlock(Block):
    """Like ComfyUI's CLIPLayer: the residual stream is updated in place (``x += ...``)."""

    def forward(self, x):
        x = x.clone() if not x.requires_grad and x.is_leaf else x
        x += torch.tanh(self.lin(x))
        return x


def test_recorded_layers_survive_in_place_updates_of_later_blocks():
    torch.manual_seed(1)
    blocks = nn.ModuleList(InPlaceBlock(8) for _ in range(4))
    x = torch.randn(2, 5, 8)
    every, h = [], x
    for b in blocks:
        h = b(h)
        every.append(h.clone())
    with record_layers(blocks, (1, 2, 4)) as store:
        y = x
        for b in blocks:
            y = b(y)
    feats = stack_levels(store, (1, 2, 4))
    for i, layer in enumerate((1, 2, 4)):
        assert torch.equal(feats[:, i], every[layer - 1]), layer
