"""The pack's model folders, registered with ComfyUI's folder_paths when the nodes load."""
from __future__ import annotations

import os

import folder_paths

# troupe: fusion weights and adapters (safetensors / safe .bin); dino: local HF DINOv2/DINOv3 folders;
# openclip: OpenCLIP folders (open_clip_config.json + weights) or weight files for the fidelity metrics.
FOLDERS = ("troupe", "dino", "openclip")


def register_model_folders() -> None:
    """Add ``models/troupe``, ``models/dino`` and ``models/openclip`` (keeping any extra paths the user configured)."""
    for name in FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, exts = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(exts) | folder_paths.supported_pt_extensions)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(folder_paths.supported_pt_extensions))


def list_files(folder: str, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth")) -> list[str]:
    """Weight files in one of the pack's folders (recursive, relative names)."""
    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(suffixes)]


def check_listed(node: str, input_name: str, folder: str, name: str, what: str = "file") -> bool | str:
    """``validate_inputs`` for a combo of files in one of the pack's folders (0.3.75 does not check V3 combos)."""
    if name in list_files(folder):
        return True
    return (f"{node}: input '{input_name}': no file '{name}' in models/{folder}; put the {what} there and "
            "refresh (R), or pick another")


def list_hf_folders(folder: str) -> list[str]:
    """Sub-folders holding a HF transformers model (a config.json), relative to the folder's roots."""
    found = []
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            if "config.json" in files:
                found.append(os.path.relpath(dirpath, root))
    return sorted(set(found))


def hf_folder_path(folder: str, name: str) -> str:
    """The absolute path of a listed HF model folder; a clear error when it is gone."""
    for root in folder_paths.get_folder_paths(folder):
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise ValueError(f"no model folder '{name}' with a config.json in models/{folder}; "
                     f"put the HF model folder (config.json + model.safetensors) there and refresh")
