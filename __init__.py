"""ComfyUI-Troupe: zero-shot multi-subject personalised generation for ComfyUI (SDXL and FLUX)."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this once at start-up; nodes are imported here, not at import time."""
    from .nodes import TroupeExtension

    return TroupeExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
