"""TEST-ONLY ComfyUI node pack: tiny random-weight models, so API-format workflows run end to end in seconds.

tests/comfy_server.py loads every package in tests/custom_nodes/ through extra_model_paths.yaml; the
shipped pack never registers these nodes. The models come from tests/fixtures/tiny_models.py.
"""
import os

THREADS_ENV = "TROUPE_TEST_TORCH_THREADS"


def pin_torch_threads() -> None:
    """Run the test server's torch on TROUPE_TEST_TORCH_THREADS intra-op threads (default 1; 0 leaves torch alone).

    On the 2-vCPU dev VM two OpenMP threads make tiny-model forwards erratic and 5-30x slower: a 4-step
    tiny SDXL prompt took 6-18 s with torch's default and 0.6-1.5 s with one thread.
    """
    n = int(os.environ.get(THREADS_ENV, "1") or 0)
    if n > 0:
        import torch

        torch.set_num_threads(n)


async def comfy_entrypoint():
    """V3 entry point; the node module (and torch, comfy) are imported here, not at import time."""
    from .nodes import TroupeTestExtension

    pin_torch_threads()
    return TroupeTestExtension()


__all__ = ["comfy_entrypoint"]
