"""Shared pytest set-up: the pack importable as ``comfyui_troupe``, and the real ComfyUI server."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
MSBENCH = ROOT / "benchmarks" / "msbench"
ARTIFACTS = ROOT / "test-artifacts"
PACKAGE = "comfyui_troupe"


def _register_pack() -> None:
    """Import the repository as the package ``comfyui_troupe`` (its folder name has a hyphen)."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


_register_pack()

# hypothesis: the same examples on every run in CI (derandomised); HYPOTHESIS_PROFILE=troupe-explore searches further
from hypothesis import HealthCheck, settings

settings.register_profile("troupe-ci", derandomize=True, max_examples=150, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("troupe-explore", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "troupe-ci"))
# the CI machine has 2 vCPUs: torch's default pool makes tiny fixture models 5-30x slower
import torch

torch.set_num_threads(1)
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def msbench() -> Path:
    """The MS-Bench folder shipped in benchmarks/msbench (real subject photos, MIT licence)."""
    if not (MSBENCH / "msbench.json").exists():
        pytest.fail(f"MS-Bench is missing at {MSBENCH}: it is part of the repository; restore it with git checkout")
    return MSBENCH


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Path:
    """A folder for one module's shared fixtures, removed when the module ends: a training run with checkpoints
    writes about a gigabyte, and pytest's own clean-up (``tmp_path_retention_policy``) covers only ``tmp_path``."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _model_folders_forget_removed_tmp(tmp_path_factory):
    """ComfyUI's model-folder registry and its file-list cache are global: when a module ends, folders it registered
    under pytest's temporary root that are gone now (``module_tmp``, a passed test's ``tmp_path``) are dropped and
    the cache is cleared, so no later module lists a folder that no longer exists."""
    yield
    fp = sys.modules.get("folder_paths")
    if fp is None:
        return
    base = str(tmp_path_factory.getbasetemp())
    for name, (paths, exts) in list(fp.folder_names_and_paths.items()):
        kept = [p for p in paths if not (str(p).startswith(base) and not os.path.exists(p))]
        if len(kept) != len(paths):
            fp.folder_names_and_paths[name] = (kept, exts)
    fp.filename_list_cache.clear()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def comfy_server():
    """One real ComfyUI server from .host/ with the pack and the test nodes, for the whole session."""
    from comfy_server import ComfyServer

    server = ComfyServer(with_test_nodes=True)
    server.start()
    yield server
    server.cleanup()
