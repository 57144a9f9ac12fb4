"""The training toolkit: train the adapter weights the papers never released (R^3-Adapter, MultiPersona-Align).

Plain torch plus ComfyUI's loaders and HF ``accelerate``; run with ``python troupe_train.py`` (see ``docs/training.md``).
"""
