"""The ComfyUI-Troupe training command; run it with the Python that runs ComfyUI (see docs/training.md).

    python custom_nodes/ComfyUI-Troupe/troupe_train.py train my_run.toml
    accelerate launch --multi_gpu --num_processes 4 custom_nodes/ComfyUI-Troupe/troupe_train.py train my_run.toml

It finds ComfyUI (``--comfyui PATH``, else ``$COMFYUI_PATH``, else the folder this pack is installed in), makes its
``comfy`` package and model folders importable, and runs ``training.cli``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "comfyui_troupe"


def comfyui_folder(argv: list[str]) -> Path | None:
    if "--comfyui" in argv:
        i = argv.index("--comfyui")
        if i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    guess = HERE.parent.parent  # ComfyUI/custom_nodes/<this pack>
    return guess if (guess / "comfy").is_dir() else None


def setup_comfyui(folder: Path | None) -> None:
    """Import ComfyUI from ``folder`` the way its main.py sets itself up (CPU when there is no GPU)."""
    if folder is None or not (folder / "comfy").is_dir():
        sys.exit("troupe_train: ComfyUI not found; pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")
    sys.path.insert(0, str(folder))
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management
    import folder_paths

    extra = folder / "extra_model_paths.yaml"
    if extra.is_file():
        from utils.extra_config import load_extra_path_config

        load_extra_path_config(str(extra))
    del folder_paths


def import_pack():
    spec = importlib.util.spec_from_file_location(PACKAGE, HERE / "__init__.py", submodule_search_locations=[str(HERE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("-h", "--help") and "validate" not in argv and "make-manifest" not in argv:
        setup_comfyui(comfyui_folder(argv))
    import_pack()
    from comfyui_troupe.training.cli import main

    sys.exit(main(argv))
