"""No boxes drawn: the subjects are placed in equal columns over the middle of the canvas (issue 15, item 6)."""
from __future__ import annotations

import itertools

import pytest
import torch
from fixtures.tiny_models import ensure_comfy

from comfyui_troupe.models.layout.layout import default_boxes
from comfyui_troupe.models.layout.subject import Subject

EMPTY = '{"version": 1, "boxes": []}'


def test_equal_columns_over_the_middle_half_on_the_latent_grid():
    assert default_boxes(2, 1024, 1024) == [(0.0, 0.25, 0.5, 0.75), (0.5, 0.25, 1.0, 0.75)]
    # 1000 / 3 px columns snap to the 8-px grid: 336 and 664 px (333.3 -> 336, 666.7 -> 664)
    assert default_boxes(3, 1000, 600) == [(0.0, 152 / 600, 336 / 1000, 448 / 600),
                                           (336 / 1000, 152 / 600, 664 / 1000, 448 / 600),
                                           (664 / 1000, 152 / 600, 1.0, 448 / 600)]
    for n in range(1, 9):
        boxes = default_boxes(n, 1216, 832)
        assert len(boxes) == n and boxes[0][0] == 0.0 and boxes[-1][2] == 1.0
        assert all(a[2] == b[0] for a, b in itertools.pairwise(boxes))  # columns touch, never overlap
        for x0, y0, x1, y1 in boxes:
            assert x0 < x1 and y0 < y1
            assert all(abs(v * s - round(v * s / 8) * 8) < 1e-9 for v, s in ((x0, 1216), (x1, 1216), (y0, 832)))


@pytest.fixture()
def layout_node():
    ensure_comfy()
    from comfyui_troupe.nodes import layout

    return layout


def subject(label: str) -> Subject:
    return Subject(image=torch.zeros(1, 8, 8, 3), label=label)


def test_the_node_uses_the_auto_layout_with_subjects_and_labels_it(layout_node):
    layout = layout_node.build_layout(1024, 512, EMPTY, (subject("dog"), subject("cat"), subject("teapot")))
    assert [r.box for r in layout.regions] == default_boxes(3, 1024, 512)
    assert [r.label for r in layout.regions] == ["dog", "cat", "teapot"]


def test_no_boxes_and_no_subjects_still_fails_clearly(layout_node):
    for subjects in (None, ()):
        with pytest.raises(ValueError, match=r"no boxes and no subjects: connect the subject list"):
            layout_node.build_layout(1024, 1024, EMPTY, subjects)
    out = layout_node.TroupeLayout.execute(width=512, height=512, boxes=EMPTY, subjects=(subject("dog"),))
    assert out.result[0].regions[0].box == (0.0, 0.25, 1.0, 0.75)
