"""One patch lifecycle for every Troupe patch: install on a clone, one key per instance, per-run state freed at run end.

A patch object (``models/``, plain torch) holds only data that does not change while sampling (tokens, weights,
options), so two clones may share it whatever the host's clone does (0.3.75 deep-copies ``model_options``,
ComfyUI >= 0.33 copies only its dicts and lists and shares every other object). ``install`` clones the model
and puts the patch on the clone's hook points, each under a key made for this patch instance
(``troupe_<family>_<uuid>``), keeping the hook already there as ``previous``:

| hook point | ComfyUI setter | patch method |
| --- | --- | --- |
| attn2 replace (SDXL UNet) | ``set_model_attn2_replace`` | ``attn2(q, k, v, extra_options, run, previous)`` |
| DiT block replace (FLUX) | ``set_model_patch_replace(.., "dit", ..)`` | ``dit_block(key, args, extra, run, previous)`` |
| model function wrapper | ``set_model_unet_function_wrapper`` | ``model_function(apply_model, params, run, previous)`` |
| DIFFUSION_MODEL wrapper | ``add_wrapper_with_key`` (model_options) | ``diffusion_model(executor, *args, **kwargs)`` |

Per-run state: one OUTER_SAMPLE wrapper per instance (``RunScope``, the pattern of ComfyUI's own EasyCache)
creates a fresh ``RunState`` for each sampling run in the run's copy of ``transformer_options`` and empties it
in ``finally``, so a run that is interrupted or fails frees it too. The hooks hand its ``cache`` dict to the
patch as ``run``. A model call outside any sampling run gets an empty dict per hook call: the same numbers,
nothing kept. Nothing here relies on ``__deepcopy__`` for isolation: the hooks return themselves from it so
that 0.3.75 shares them as 0.33 does.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import comfy.patcher_extension
import comfy.utils

from ..models import setup_progress
from ..models.attention_record import RUN_KEY, Recording

LOG = logging.getLogger(__name__)
RECORDER = "troupe_attention_recorder"  # transformer_options key: the AttentionRecorder of the run in progress
RUNS = "troupe_runs"  # transformer_options key: {instance key: RunState} of the sampling run in progress
AttnKey = tuple[str, int, int]  # ("input" | "middle" | "output", block, transformer index)
DitKey = tuple[str, int]  # ("double_block" | "single_block", index)


# --------------------------------------------------------------------------- per-run state


class RunState:
    """What one patch instance computed once for one sampling run (``cache``); emptied when the run ends."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.cache: dict = {}

    def release(self) -> None:
        self.cache.clear()


def run_cache(transformer_options: dict | None, key: str) -> dict:
    """The run cache of instance ``key`` in this call's options, or a new empty dict outside a sampling run; it
    holds the run's attention recorder (``RECORDER``, from ``RecordScope``) under ``attention_record.RUN_KEY``."""
    state = ((transformer_options or {}).get(RUNS) or {}).get(key)
    if state is None:
        return {}
    recorder = transformer_options.get(RECORDER)
    if recorder is not None and RUN_KEY not in state.cache:
        state.cache[RUN_KEY] = recorder
    return state.cache


class SetupProgress:
    """The reporter a run's patch calls (``setup_progress.setup_done``): each hook point counted once, a ComfyUI
    ProgressBar over all of them made at the first report (on the executing node: the sampler)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done: set = set()
        self.bar = None

    def __call__(self, *points) -> None:
        before = len(self.done)
        if before >= self.total:
            return
        self.done.update(points)
        if len(self.done) == before:
            return
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(self.total)
        self.bar.update_absolute(min(len(self.done), self.total), self.total)


class RunScope:
    """OUTER_SAMPLE wrapper of one instance: a fresh ``RunState`` for the run, released in ``finally``."""

    def __init__(self, key: str, canvas: tuple[int, int] | None = None, setup_points: int = 0) -> None:
        self.key = key
        self.canvas = canvas  # (width, height) of the layout the patch places subjects with, if any
        self.setup_points = setup_points  # hook points whose once-per-run setup the progress bar counts

    def __deepcopy__(self, memo: dict) -> RunScope:
        return self

    def __call__(self, executor, *args, **kwargs):
        shape = tuple(getattr(args[0], "shape", ())) if args else ()
        if self.canvas is not None and len(shape) == 4 and (warning := canvas_mismatch(self.canvas, shape[-2:])):
            LOG.warning(warning)
        guider = executor.class_obj
        original = guider.model_options
        state = RunState(self.key)
        if self.setup_points:
            state.cache[setup_progress.RUN_KEY] = SetupProgress(self.setup_points)
        options = dict(original)
        to = dict(options.get("transformer_options") or {})
        to[RUNS] = {**(to.get(RUNS) or {}), self.key: state}
        options["transformer_options"] = to
        guider.model_options = options
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original
            state.release()


def canvas_mismatch(canvas: tuple[int, int], latent_hw: tuple[int, int], tolerance: float = 0.02) -> str | None:
    """A warning when the layout's canvas and the sampled latent differ in aspect ratio (the boxes would stretch).

    Boxes are fractions of the canvas, so any size of the same shape places them as drawn: an SDXL-sized square
    layout sampled at FLUX's 1360 x 768 is what this catches (the image is sampled, the warning says what to fix).
    """
    width, height = canvas
    lh, lw = latent_hw
    drawn, sampled = width / height, lw / lh
    if abs(drawn / sampled - 1.0) <= tolerance:
        return None
    return (f"Troupe: the layout was drawn on a {width} x {height} canvas (aspect {drawn:.3f}) but the latent is "
            f"{lw} x {lh} (aspect {sampled:.3f}): the boxes are stretched to fit; set TroupeLayout's width and height "
            "to the size you sample (the empty latent's)")


class RecordScope:
    """OUTER_SAMPLE wrapper of TroupeAttentionMaps: a fresh recorder for the run, published when it ends."""

    def __init__(self, recording: Recording) -> None:
        self.recording = recording

    def __deepcopy__(self, memo: dict) -> RecordScope:
        return self

    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        recorder = self.recording.start()
        options = dict(original)
        options["transformer_options"] = {**(options.get("transformer_options") or {}), RECORDER: recorder}
        guider.model_options = options
        try:
            out = executor(*args, **kwargs)
        finally:
            guider.model_options = original
        self.recording.finish(recorder)
        return out


def install_recorder(model, recording: Recording):
    """A clone of ``model`` whose sampling runs record every Troupe patch's attention maps into ``recording``."""
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, new_key("record"),
                               RecordScope(recording))
    return clone


@contextlib.contextmanager
def model_call_scope(model) -> Iterator[dict]:
    """Run-scoped ``transformer_options`` for model calls made outside a sampler (benchmarks, tests)."""
    states = {key: RunState(key) for key in installed(model)}
    to = {**model.model_options.get("transformer_options", {}), RUNS: states}
    try:
        yield to
    finally:
        for state in states.values():
            state.release()


# --------------------------------------------------------------------------- hooks


class Hook:
    """A hook of one patch instance: the patch, the instance key, and the hook that was at this point before."""

    def __init__(self, key: str, patch: Any, previous: Callable | None = None) -> None:
        self.key, self.patch, self.previous = key, patch, previous

    def __deepcopy__(self, memo: dict) -> Hook:
        return self  # holds no per-run state: shared by clones on every host

    def to(self, device) -> Hook:
        """ModelPatcher moves replace patches: pass it on to the hook this one wraps."""
        moved = self.previous.to(device) if hasattr(self.previous, "to") else self.previous
        if moved is self.previous:
            return self
        new = copy.copy(self)
        new.previous = moved
        return new


class Attn2Hook(Hook):
    def __call__(self, q, k, v, extra_options: dict):
        return self.patch.attn2(q, k, v, extra_options, run_cache(extra_options, self.key), self.previous)


class DitBlockHook(Hook):
    def __init__(self, key: str, patch: Any, block: DitKey, previous: Callable | None = None) -> None:
        super().__init__(key, patch, previous)
        self.block = block

    def __call__(self, args: dict, extra: dict):
        run = run_cache(args.get("transformer_options"), self.key)
        return self.patch.dit_block(self.block, args, extra, run, self.previous)


class ModelFunctionHook(Hook):
    def __call__(self, apply_model, params: dict):
        run = run_cache((params.get("c") or {}).get("transformer_options"), self.key)
        return self.patch.model_function(apply_model, params, run, self.previous)


class DiffusionModelHook(Hook):
    def __call__(self, executor, *args, **kwargs):
        return self.patch.diffusion_model(executor, *args, **kwargs)


# --------------------------------------------------------------------------- installing


def new_key(family: str) -> str:
    """A key of its own for one patch instance (never a fixed one: a second node must not replace the first)."""
    return f"troupe_{family}_{uuid.uuid4().hex}"


def install(model, patch: Any, family: str, *, attn2: Iterable[AttnKey] = (), dit: Iterable[DitKey] = (),
            model_function: bool = False, diffusion_model: bool = False, canvas: tuple[int, int] | None = None):
    """A clone of ``model`` with ``patch`` on the given hook points and its run scope; ``model`` is untouched."""
    clone = model.clone()
    key = new_key(family)
    attn2, dit = list(attn2), list(dit)
    replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {})
    existing = replaces.get("attn2", {})
    for block, index, j in attn2:
        previous = existing.get((block, index, j)) or existing.get((block, index))
        clone.set_model_attn2_replace(Attn2Hook(key, patch, previous), block, index, j)
    existing = replaces.get("dit", {})
    for name, index in dit:
        hook = DitBlockHook(key, patch, (name, index), existing.get((name, index)))
        clone.set_model_patch_replace(hook, "dit", name, index)
    if model_function:
        clone.set_model_unet_function_wrapper(ModelFunctionHook(key, patch,
                                                                clone.model_options.get("model_function_wrapper")))
    wrappers = comfy.patcher_extension.WrappersMP
    if diffusion_model:  # in model_options, so a direct apply_model call (no sampler) runs it too
        comfy.patcher_extension.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, key, DiffusionModelHook(key, patch),
                                                     clone.model_options, is_model_options=True)
    points = len(attn2) + len(dit) + int(model_function)  # the hooks that hand the patch its run state
    clone.add_wrapper_with_key(wrappers.OUTER_SAMPLE, key, RunScope(key, canvas, points))
    return clone


def installed(model) -> dict[str, Any]:
    """Every Troupe patch instance on a model, key -> patch, outermost first (found through its hooks)."""
    found: dict[str, Any] = {}

    def visit(hook) -> None:
        while isinstance(hook, Hook):
            found.setdefault(hook.key, hook.patch)
            hook = hook.previous

    visit(model.model_options.get("model_function_wrapper"))
    for table in model.model_options.get("transformer_options", {}).get("patches_replace", {}).values():
        for hook in table.values():
            visit(hook)
    return found


def run_scopes(model) -> list[str]:
    """The instance keys of the model's run scopes (one per installed instance)."""
    outer = model.wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {})
    return [key for key, ws in outer.items() if any(isinstance(w, RunScope) for w in ws)]
