"""Test helpers for the patch lifecycle (nodes/lifecycle.py): record every run's state; clone as ComfyUI 0.33 does.

``runs`` records each ``RunState`` the lifecycle creates, with how many entries its cache held when the run
released it, so a test sees that the run used it and that nothing was left. ``clones`` runs a test under both
clone semantics: the host's own ``ModelPatcher.clone`` and, emulated, the one of ComfyUI >= 0.33 (PR 12382:
only the dicts and lists of ``model_options`` are copied, every other object is shared, ``__deepcopy__`` is
never called). On a 0.33 host both are the same.
"""
from __future__ import annotations

import pytest


class RunRecorder:
    """Every RunState created while the fixture is active, in creation order."""

    def __init__(self) -> None:
        self.states: list = []

    def keys(self) -> list[str]:
        return [s.key for s in self.states]

    def leftover(self) -> dict[str, int]:
        """Cache entries still held, per state (empty when every run released its state)."""
        return {s.key: len(s.cache) for s in self.states if s.cache}

    def clear(self) -> None:
        self.states.clear()


@pytest.fixture
def runs(monkeypatch) -> RunRecorder:
    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    from comfyui_troupe.models import setup_progress
    from comfyui_troupe.nodes import lifecycle

    recorder = RunRecorder()

    class Recorded(lifecycle.RunState):
        def __init__(self, key: str) -> None:
            super().__init__(key)
            self.held = 0  # entries in the cache when the run released it
            recorder.states.append(self)

        def release(self) -> None:  # the setup-progress reporter the scope puts in is not something the patch cached
            self.held = len([k for k in self.cache if k != setup_progress.RUN_KEY])
            super().release()

    monkeypatch.setattr(lifecycle, "RunState", Recorded)
    return recorder


def copy_dicts_and_lists(obj, memo: dict | None = None):
    """What ComfyUI >= 0.33 copies of ``model_options`` in a clone: dicts and lists, nothing else."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = {copy_dicts_and_lists(k, memo): copy_dicts_and_lists(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        out = [copy_dicts_and_lists(v, memo) for v in obj]
    else:
        out = obj
    memo[id(obj)] = out
    return out


@pytest.fixture(params=["host", "shallow"])
def clones(request, monkeypatch) -> str:
    """Run the test with the host's clone, then with the clone of ComfyUI >= 0.33 (shared model_options objects)."""
    from fixtures.tiny_models import ensure_comfy

    ensure_comfy()
    if request.param == "shallow":
        import comfy.model_patcher

        original = comfy.model_patcher.ModelPatcher.clone

        def clone(self, *args, **kwargs):
            n = original(self, *args, **kwargs)
            n.model_options = copy_dicts_and_lists(self.model_options)
            return n

        monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "clone", clone)
    return request.param


def sample(model, positive: list, negative: list, latent, *, steps: int = 3, cfg: float = 2.0, callback=None):
    """``fixtures.tiny_models.sample`` (what KSampler does, seed 0, euler / simple) with a step callback."""
    import comfy.sample
    import torch

    with torch.inference_mode():
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=0,
                                   disable_pbar=True, callback=callback)


def fingerprint(model) -> object:
    """What a run could change in the Troupe objects a model's clones share: every hook and patch object, walked
    through its attributes, dicts, lists and dataclasses (a tensor by identity and in-place version counter,
    a torch module or a foreign object by identity). Equal before, during and after a run = no shared state."""
    import torch

    from comfyui_troupe.nodes import lifecycle

    seen: dict[int, object] = {}

    def walk(x, depth: int = 0):
        if id(x) in seen or depth > 12:
            return ("ref", id(x))
        seen[id(x)] = x
        if isinstance(x, torch.Tensor):
            return ("tensor", id(x), x._version)
        if isinstance(x, torch.nn.Module) or callable(x) and not hasattr(x, "__dict__"):
            return ("object", id(x))
        if isinstance(x, dict):
            return ("dict", id(x), tuple((repr(k), walk(v, depth + 1)) for k, v in x.items()))
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(walk(v, depth + 1) for v in x))
        if type(x).__module__.startswith(("comfyui_troupe", "lifecycle_probe")) and hasattr(x, "__dict__"):
            return (type(x).__name__, id(x), tuple((k, walk(v, depth + 1)) for k, v in sorted(vars(x).items())))
        return ("object", id(x))

    hooks = [h for table in model.model_options.get("transformer_options", {}).get("patches_replace", {}).values()
             for h in table.values() if isinstance(h, lifecycle.Hook)]
    return walk((tuple(hooks), tuple(lifecycle.installed(model).values())))
