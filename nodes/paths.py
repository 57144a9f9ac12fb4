"""The pack's model folders, registered with ComfyUI's folder_paths when the nodes load."""
from __future__ import annotations

import os

import folder_paths

# troupe: fusion weights and adapters (safetensors / safe .bin); dino: local HF DINOv2/DINOv3 folders;
# openclip: OpenCLIP folders (open_clip_config.json + weights) or weight files for the fidelity metrics.
FOLDERS = ("troupe", "dino", "openclip")
# Where other packs' users keep adapter files (folder_paths key -> folder under models/): cubiq's IPAdapter_plus
# (models/ipadapter), Shakker-Labs' InstantX FLUX node (models/ipadapter-flux), XLabs' x-flux-comfyui
# (models/xlabs/ipadapters). Registered only when missing, so the other pack's own entry and the user's
# extra_model_paths.yaml paths are kept.
SHARED_FOLDERS = {"ipadapter": "ipadapter", "ipadapter-flux": "ipadapter-flux",
                  "xlabs_ipadapters": os.path.join("xlabs", "ipadapters")}
ADAPTER_FOLDERS = ("troupe", "ipadapter", "ipadapter-flux", "xlabs_ipadapters")
LORA_FOLDERS = ("troupe", "loras")


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
    for name, sub in SHARED_FOLDERS.items():
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, sub)],
                                                         set(folder_paths.supported_pt_extensions))


def list_files(folder: str, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth")) -> list[str]:
    """Weight files in one of the pack's folders (recursive, relative names)."""
    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(suffixes)]


def folder_label(folder: str) -> str:
    """How a folder is named to the user: its path under models/."""
    return "models/" + SHARED_FOLDERS.get(folder, folder).replace(os.sep, "/")


def files_in(folders: tuple[str, ...]) -> dict[str, str]:
    """Combo name -> full path for the weight files of several folders, first folder first; a file found twice
    (one directory under two names) is listed once; a name in two folders shows its folder: 'x.bin [models/loras]'."""
    found: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for folder in folders:
        if folder not in folder_paths.folder_names_and_paths:
            continue
        for name in list_files(folder):
            path = folder_paths.get_full_path(folder, name)
            if path is None or os.path.realpath(path) in seen:
                continue
            seen.add(os.path.realpath(path))
            found.append((folder, name, path))
    counts: dict[str, int] = {}
    for _folder, name, _path in found:
        counts[name] = counts.get(name, 0) + 1
    return {(name if counts[name] == 1 else f"{name} [{folder_label(folder)}]"): path for folder, name, path in found}


def choices(folders: tuple[str, ...]) -> list[str]:
    """The combo's options for files in several folders."""
    return sorted(files_in(folders), key=str.lower)


def full_path(node: str, input_name: str, folders: tuple[str, ...], name: str) -> str:
    """The file a combo value names; a clear error naming the folders when it is gone."""
    path = files_in(folders).get(name)
    if path is None:
        where = ", ".join(folder_label(f) for f in folders)
        raise ValueError(f"{node}: input '{input_name}': no file '{name}' in {where}; put it there and refresh (R), "
                         "or pick another")
    return path


def check_listed_in(node: str, input_name: str, folders: tuple[str, ...], name: str, what: str = "file") -> bool | str:
    """``validate_inputs`` for a combo of files from several folders."""
    if name in files_in(folders):
        return True
    where = ", ".join(folder_label(f) for f in folders)
    return f"{node}: input '{input_name}': no file '{name}' in {where}; put the {what} there and refresh (R), or pick another"


def check_listed(node: str, input_name: str, folder: str, name: str, what: str = "file") -> bool | str:
    """``validate_inputs`` for a combo of files in one of the pack's folders (0.3.75 does not check V3 combos)."""
    if name in list_files(folder):
        return True
    return (f"{node}: input '{input_name}': no file '{name}' in models/{folder}; put the {what} there and "
            "refresh (R), or pick another")


def check_dino_folder(node: str, name: str | None, none: str) -> bool | str:
    """``validate_inputs`` for a ``dino_model`` combo: 'none' or a listed HF model folder in models/dino."""
    if name in (None, none) or name in list_hf_folders("dino"):
        return True
    return (f"{node}: input 'dino_model': no folder '{name}' with a config.json in models/dino; put the HF model "
            "folder there and refresh, or pick 'none'")


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
