"""``python troupe_train.py``: train an adapter, validate a dataset manifest, or build one from a folder.

    python troupe_train.py train config.toml                                        # 1 CPU or 1 GPU
    accelerate launch --multi_gpu --num_processes 4 troupe_train.py train config.toml  # 4 GPUs (--num_machines,
                                                                          # --machine_rank, --main_process_ip: nodes)
    torchrun --nproc_per_node 2 troupe_train.py train config.toml                   # 2 CPU processes (gloo)
    python troupe_train.py validate data/manifest.jsonl
    python troupe_train.py make-manifest photos/ --out data/manifest.jsonl --label dog
    python troupe_train.py correspond data/manifest.jsonl --dino dinov2-base --threshold 0.5   # mosaic pseudo-labels
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import REFERENCE_METHODS, Config, ConfigError, load_config
from .manifest import ManifestError, build_manifest, validate_manifest


def _resolve(kind: str, name: str, key: str) -> str:
    """A config value that is a path, or a file name in one of ComfyUI's model folders."""
    import folder_paths

    if os.path.exists(name):
        return name
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        known = ", ".join(folder_paths.get_filename_list(kind)[:8]) or "none"
        raise ConfigError(f"{key}: {name!r} is neither a file nor a name in models/{kind} (found there: {known}); give "
                          "a path or copy the file into that folder")
    return path


def load_components(config: Config):
    """The frozen models the config names, through ComfyUI's own loaders (any SDXL checkpoint ComfyUI loads)."""
    import comfy.clip_vision
    import comfy.sd
    import folder_paths

    from ..models.adapter_file import detect_and_load, read_state_dict
    from ..models.encoding.dino import load_hf_dino
    from ..nodes import paths
    from ..nodes.adapter import families
    from .trainer import Components

    paths.register_model_folders()
    if config.method.flux:
        return load_flux_components(config)
    ckpt = _resolve("checkpoints", config.model.checkpoint, "model.checkpoint")
    print(f"[troupe-train] loading {ckpt}")
    patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        ckpt, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    if not hasattr(patcher.model.diffusion_model, "input_blocks"):
        raise ConfigError(f"model.checkpoint: {ckpt} is not an SDXL checkpoint (its model is a "
                          f"{type(patcher.model.diffusion_model).__name__}); the SDXL methods train on SDXL")
    clip_vision = comfy.clip_vision.load(_resolve("clip_vision", config.model.clip_vision, "model.clip_vision"))
    dino = None
    if config.model.dino:
        folder = config.model.dino if os.path.isdir(config.model.dino) else paths.hf_folder_path("dino", config.model.dino)
        dino = load_hf_dino(folder)
    initial = None
    if config.method.init_adapter:
        name = config.method.init_adapter
        path = name if os.path.exists(name) else paths.full_path("troupe_train", "method.init_adapter",
                                                                 paths.ADAPTER_FOLDERS, name)
        adapter = detect_and_load(read_state_dict(path), families(), filename=os.path.basename(path))
        if adapter.family != "sdxl":
            raise ConfigError(f"method.init_adapter: {name} is a {adapter.family} adapter; the SDXL methods continue an "
                              "MS-Diffusion or R^3 file")
        initial = adapter.module
    return Components(base_model=patcher.model, clip=clip, vae=vae, clip_vision=clip_vision, dino=dino,
                      initial_adapter=initial, owned=True)


def load_flux_components(config: Config):
    """FLUX.1-dev as separate files (diffusion model, CLIP-L + T5-XXL with the FLUX clip type, VAE) through ComfyUI's
    loaders, the CLIP vision encoder, and for ``method.init_adapter`` a troupe-flux file (with the fusion file beside
    it, ``<stem>.hmoe.safetensors``, when there is one)."""
    import comfy.clip_vision
    import comfy.sd
    import comfy.utils
    import folder_paths

    from ..models.adapter_file import detect_and_load, read_state_dict
    from ..models.encoding.dino import load_hf_dino
    from ..models.encoding.hmoe import hmoe_from_state_dict
    from ..nodes import paths
    from ..nodes.adapter import families
    from .trainer import Components

    m = config.model
    unet = _resolve("diffusion_models", m.unet, "model.unet")
    print(f"[troupe-train] loading {unet}")
    patcher = comfy.sd.load_diffusion_model(unet)
    if not hasattr(patcher.model.diffusion_model, "double_blocks"):
        raise ConfigError(f"model.unet: {unet} is not a FLUX model (its model is a "
                          f"{type(patcher.model.diffusion_model).__name__}); dynaip trains on FLUX.1-dev")
    clip = comfy.sd.load_clip(ckpt_paths=[_resolve("text_encoders", m.clip_l, "model.clip_l"),
                                          _resolve("text_encoders", m.t5, "model.t5")],
                              embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=comfy.sd.CLIPType.FLUX)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(_resolve("vae", m.vae, "model.vae")))
    # the reference-branch methods (mosaic) need no CLIP vision and start a new LoRA (the method refuses init_adapter)
    clip_vision = comfy.clip_vision.load(_resolve("clip_vision", m.clip_vision, "model.clip_vision")) if (
        m.clip_vision) else None
    initial, fusion = None, None
    if config.method.init_adapter and config.method.name not in REFERENCE_METHODS:
        name = config.method.init_adapter
        path = name if os.path.exists(name) else paths.full_path("troupe_train", "method.init_adapter",
                                                                 paths.ADAPTER_FOLDERS, name)
        adapter = detect_and_load(read_state_dict(path), families(), filename=os.path.basename(path))
        if adapter.format != "troupe-flux":
            raise ConfigError(f"method.init_adapter: {name} is a {adapter.format} adapter; dynaip continues a "
                              "troupe-flux file")
        initial = adapter.module
        beside = Path(path).with_name(Path(path).stem + ".hmoe.safetensors")
        if beside.exists():
            fusion = hmoe_from_state_dict(read_state_dict(str(beside)))
    dino = load_hf_dino(dino_folder(m.dino, "model.dino")) if m.dino else None  # focusdpo-flux's focus maps
    return Components(base_model=patcher.model, clip=clip, vae=vae, clip_vision=clip_vision, dino=dino,
                      initial_adapter=initial, initial_fusion=fusion, owned=True)


def dino_folder(name: str, key: str) -> str:
    """A DINO folder: a path, or a folder name in ComfyUI's models/dino."""
    from ..nodes import paths

    if os.path.isdir(name):
        return name
    paths.register_model_folders()
    try:
        return paths.hf_folder_path("dino", name)
    except ValueError as e:
        raise ConfigError(f"{key}: {name!r} is neither a folder nor a folder in models/dino ({e})") from None


def correspond(args) -> int:
    """``correspond``: pseudo-correspondences into the manifest (training/correspondence.py)."""
    from ..models.encoding.dino import DinoModelError, load_hf_dino
    from .correspondence import DEFAULT_RESOLUTION, DEFAULT_THRESHOLD, correspond_manifest

    try:
        name = args.dino or (load_config(args.config).model.dino if args.config else "")
        if not name:
            raise ConfigError("--dino: no DINO model; pass --dino PATH (a DINOv2/v3 ViT folder) or --config with "
                              "model.dino set")
        encoder = load_hf_dino(dino_folder(name, "--dino" if args.dino else "model.dino"))
        threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"--threshold: expected a cosine similarity in [-1, 1], got {threshold}")
        report = correspond_manifest(args.manifest, encoder, args.out, threshold,
                                     args.resolution or DEFAULT_RESOLUTION)
    except (ConfigError, ManifestError, DinoModelError, FileNotFoundError) as e:
        print(f"troupe_train: {e}", file=sys.stderr)
        return 2
    print(report.summary(args.out or args.manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="troupe_train.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=None, help="the ComfyUI folder (default: the one this pack is installed in)")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the adapter a TOML config describes")
    t.add_argument("config", type=Path)
    v = sub.add_parser("validate", help="check every record of a JSONL manifest and print a summary")
    v.add_argument("manifest", type=Path)
    m = sub.add_parser("make-manifest", help="a manifest from a folder of single-subject images with captions")
    m.add_argument("folder", type=Path)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--label", default=None, help="the subject word, when the images have no name.json sidecar")
    c = sub.add_parser("correspond", help="propose each subject's correspondences (mosaic) by mutual nearest "
                                          "neighbours of DINO patch features; pseudo-labels")
    c.add_argument("manifest", type=Path)
    c.add_argument("--out", type=Path, default=None, help="the new manifest (default: rewrite MANIFEST)")
    c.add_argument("--threshold", type=float, default=None, help="least cosine similarity of a pair (default 0.5)")
    c.add_argument("--dino", default=None, help="DINO folder (a path or a name in models/dino); default: the "
                                                "--config file's model.dino")
    c.add_argument("--config", type=Path, default=None, help="a training config whose model.dino to use")
    c.add_argument("--resolution", type=int, default=None, help="DINO input side in pixels (default 224)")
    args = ap.parse_args(argv)
    if args.command == "correspond":
        return correspond(args)
    if args.command == "validate":
        report = validate_manifest(args.manifest)
        print(report.summary())
        return 0 if report.ok else 1
    if args.command == "make-manifest":
        n = build_manifest(args.folder, args.out, label=args.label)
        print(f"{args.out}: {n} records")
        return 0 if n else 1
    from .trainer import TrainingInterrupted

    try:
        config = load_config(args.config)
        from .trainer import train

        result = train(config, load_components(config))
    except (ConfigError, ManifestError, FileNotFoundError) as e:
        print(f"troupe_train: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"troupe_train: interrupted; the state is saved in {e.checkpoint}; run again with "
              "train.resume = \"latest\" to continue", file=sys.stderr)
        return 130
    print(f"[troupe-train] {result.steps} steps; adapter: {result.adapter_path}; curves: {result.curves}")
    return 0
