"""Start the real ComfyUI host (.host/, or $TROUPE_HOST set by `make COMFYUI=...`) with this pack (and optionally the test nodes) and talk to it.

Used by the server and browser tests and by scripts/demo.py. Headless protocol: websocket
``/ws?clientId=ID``, ``POST /prompt``, wait for ``executing`` with ``node: None``, then
``GET /history/<id>``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from typing_extensions import Self

ROOT = Path(__file__).resolve().parent.parent
# the host folder scripts/host.sh built: .host for the default ComfyUI, another when the Makefile sets it
HOST = Path(os.environ.get("TROUPE_HOST") or ROOT / ".host")
COMFY_DIR = HOST / "ComfyUI"
TEST_NODES_DIR = ROOT / "tests" / "custom_nodes"
MODEL_FOLDERS = ("checkpoints", "clip_vision", "vae", "unet", "diffusion_models", "text_encoders",
                 "troupe", "dino", "loras", "openclip", "embeddings")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptError(RuntimeError):
    """The server refused or failed a prompt; ``payload`` holds its answer."""

    def __init__(self, message: str, payload: Any):
        super().__init__(message)
        self.payload = payload


@dataclass
class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 run from the host's venv."""

    port: int = 0
    with_test_nodes: bool = True
    workdir: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    python: Path = HOST / "venv" / "bin" / "python"

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self._own_workdir = self.workdir is None
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="troupe-comfy-"))
        self.models_dir = self.workdir / "models"
        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.temp_dir = self.workdir / "temp"
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_paths_config(self) -> Path:
        lines = ["troupe_host:", f"    base_path: {self.models_dir}"]
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {name}: {name}")
        if self.with_test_nodes:
            TEST_NODES_DIR.mkdir(exist_ok=True)
            lines.append(f"    custom_nodes: {TEST_NODES_DIR}")
        path = self.workdir / "extra_model_paths.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 180.0) -> ComfyServer:
        if not (COMFY_DIR / "main.py").exists():
            raise RuntimeError(f"{COMFY_DIR} is missing: run `make host` first")
        for d in (self.output_dir, self.input_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-api-nodes", "--disable-auto-launch",
            "--extra-model-paths-config", str(self._write_paths_config()),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_dir), "--database-url", f"sqlite:///{self.workdir / 'db.sqlite'}",
            *self.extra_args,
        ]
        # one thread: on small CI machines torch's default thread pool makes tiny models many times slower
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self._log = open(self.log_path, "w")  # noqa: SIM115  the server writes it until stop() closes it
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop the server and remove its working directory when the harness created it."""
        self.stop()
        if self._own_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ API

    def get(self, path: str, **kw) -> requests.Response:
        r = requests.get(f"{self.url}{path}", timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r

    def object_info(self) -> dict:
        return self.get("/object_info").json()

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST an API-format prompt; raise PromptError with the node errors when it is refused."""
        r = requests.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id or uuid.uuid4().hex},
                          timeout=60)
        if r.status_code != 200:
            raise PromptError(f"/prompt refused the workflow: {r.text[:2000]}", r.json())
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt finished; raise PromptError if it failed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}").json()
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    if status.get("status_str") == "error":
                        msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                        raise PromptError(f"prompt failed: {json.dumps(msgs)[:3000]}", entry)
                    return entry
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def written_images(self, entry: dict) -> list[tuple[str, dict, Path]]:
        """(node id, image entry, path on disk) of every image a finished prompt's history entry lists."""
        return [(node_id, image, self.image_path(image))
                for node_id, out in entry.get("outputs", {}).items() for image in out.get("images", [])]

    def image_path(self, image: dict) -> Path:
        """Where an image listed in a history entry's outputs lies on disk."""
        # ComfyUI writes temp images (PreviewImage, ui previews) under <--temp-directory>/temp
        base = {"output": self.output_dir, "temp": self.temp_dir / "temp",
                "input": self.input_dir}[image.get("type", "output")]
        return base / image.get("subfolder", "") / image["filename"]


def main() -> None:
    """`python tests/comfy_server.py [--port N] [--test-nodes]`: run the host in the foreground (make serve)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--test-nodes", action="store_true", help="also load the tiny test-model nodes")
    args = ap.parse_args()
    server = ComfyServer(port=args.port, with_test_nodes=args.test_nodes,
                         workdir=HOST / "serve")
    server.start()
    print(f"ComfyUI with ComfyUI-Troupe at {server.url}  (log: {server.log_path}; Ctrl+C stops it)", flush=True)
    try:
        while server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
