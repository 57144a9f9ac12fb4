"""ComfyUI progress bars on the pack's slow set-up steps (issue 15, item 4): one step per subject and view."""
from __future__ import annotations

import types

import pytest
import torch
from fixtures.tiny_models import ensure_comfy

from comfyui_troupe.models.layout.subject import Subject


@pytest.fixture()
def progress(monkeypatch):
    """The (value, total) after every update of a ComfyUI ProgressBar the pack creates (a recording stand-in:
    newer ComfyUI throttles the hook it calls, so the hook would not see every step)."""
    ensure_comfy()
    import comfy.utils

    seen: list[tuple[int, int]] = []

    class Recording:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update(self, value):
            self.current += value
            seen.append((self.current, self.total))

        def update_absolute(self, value, total=None, preview=None):
            self.total = total or self.total
            self.current = value
            seen.append((self.current, self.total))

    monkeypatch.setattr(comfy.utils, "ProgressBar", Recording)
    return seen


def test_reference_vae_encoding_counts_every_subject_and_view(progress):
    from comfyui_troupe.nodes import reference_branch

    vae = types.SimpleNamespace(encode=lambda pixels: torch.zeros(pixels.shape[0], 16, 4, 4))
    model = types.SimpleNamespace(model=types.SimpleNamespace(process_latent_in=lambda x: x))
    subjects = (Subject(image=torch.rand(2, 24, 24, 3), label="dog"),  # two views
                Subject(image=torch.rand(1, 24, 24, 3), label="cat"))
    latents, owner = reference_branch.encode_references(vae, model, subjects, 32)
    assert owner == [0, 0, 1] and len(latents) == 3
    assert progress == [(1, 3), (2, 3), (3, 3)]


def test_dino_encoding_reports_its_forward(progress):
    from fixtures.tiny_models import tiny_dinov2

    from comfyui_troupe.nodes import dino

    subjects = (Subject(image=torch.rand(1, 32, 32, 3), label="dog"),)
    dino.encode_subjects_dino(subjects, clip_vision=tiny_dinov2(layers=1))
    assert progress == [(1, 1)]


def test_reference_encoding_counts_each_subject_then_the_batched_forward(progress):
    from fixtures.tiny_models import tiny_clip_vision

    from comfyui_troupe.nodes import encoding

    subjects = tuple(Subject(image=torch.rand(1, 40, 30 + 10 * i, 3), label=f"s{i}") for i in range(3))
    features = encoding.encode_subjects(tiny_clip_vision(), subjects)
    assert features.hidden.shape[0] == 3
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
