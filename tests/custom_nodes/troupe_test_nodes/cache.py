"""The tiny models of tests/fixtures/tiny_models.py, built once per server process (deterministic seeds)."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_models.py"
MODULE_NAME = "troupe_test_fixtures.tiny_models"


def tiny_models() -> ModuleType:
    """tests/fixtures/tiny_models.py imported by file path (tests/ is not on the server's sys.path)."""
    module = sys.modules.get(MODULE_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, FIXTURES)
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module
        spec.loader.exec_module(module)
    return module


@functools.cache
def sdxl(seed: int):
    return tiny_models().tiny_sdxl(seed=seed)


@functools.cache
def flux(schnell: bool, seed: int):
    return tiny_models().tiny_flux(schnell=schnell, seed=seed)


@functools.cache
def clip_vision(layers: int, seed: int):
    return tiny_models().tiny_clip_vision(layers=layers, seed=seed)


@functools.cache
def dinov2(layers: int, seed: int):
    return tiny_models().tiny_dinov2(layers=layers, seed=seed)


@functools.cache
def vae(latent_channels: int, seed: int):
    return tiny_models().tiny_vae(latent_channels=latent_channels, seed=seed)
