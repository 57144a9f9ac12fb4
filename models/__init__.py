"""Plain torch code of ComfyUI-Troupe: no ComfyUI imports, usable and testable on its own."""
