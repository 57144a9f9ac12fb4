"""TEST-ONLY entry point for ``accelerate launch``: the trainer on the tiny models, as ``troupe_train.py train`` runs it
on real ones (only the loader differs). Usage: ``accelerate launch ... tests/train_tiny.py CONFIG.json WORKDIR``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: F401  (registers the pack as comfyui_troupe)
import torch
from fixtures.training import tiny_components

from comfyui_troupe.training.config import parse_config
from comfyui_troupe.training.trainer import train

if __name__ == "__main__":
    torch.set_num_threads(1)
    config_path, work = Path(sys.argv[1]), Path(sys.argv[2])
    config = parse_config(json.loads(config_path.read_text()), work)
    if config.method.name == "aligngen":  # the tiny FLUX.1-dev with a tiny Redux
        from fixtures.training_aligngen import aligngen_components

        components = aligngen_components()
    elif config.method.flux:  # dynaip, mosaic, focusdpo-flux: the tiny FLUX.1-dev
        from fixtures.training_flux import flux_components

        components = flux_components()
    else:
        components = tiny_components(work)
    if config.method.init_adapter:  # as troupe_train.py loads it
        from comfyui_troupe.models.adapter_file import detect_and_load, read_state_dict
        from comfyui_troupe.nodes.adapter import families

        path = config.method.init_adapter
        components.initial_adapter = detect_and_load(read_state_dict(path), families()).module
    train(config, components, show_bar=False)
