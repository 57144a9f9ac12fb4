"""Server tests: the test server also maps models/openclip (the fidelity metrics' OpenCLIP folder) to its own models
folder. tests/comfy_server.py lists the folders it maps; this adds the one the evaluation nodes read until that
list has it. It runs at collection, before the session's server starts."""
import comfy_server

if "openclip" not in comfy_server.MODEL_FOLDERS:
    comfy_server.MODEL_FOLDERS = (*comfy_server.MODEL_FOLDERS, "openclip")
