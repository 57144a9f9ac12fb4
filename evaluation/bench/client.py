"""A ComfyUI server's HTTP API, standard library only: upload an image, queue a prompt, poll its history, download."""
from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class ServerError(RuntimeError):
    """The server refused or failed a prompt, or did not answer; the message quotes what it said."""


class ComfyClient:
    def __init__(self, url: str, timeout: float = 600.0, poll: float = 0.25):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.poll = poll
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"{path}: HTTP {e.code}: {e.read().decode('utf-8', 'replace')[:3000]}") from None
        except urllib.error.URLError as e:
            raise ServerError(f"cannot reach ComfyUI at {self.url} ({e.reason}); start it (make serve) or pass "
                              "--server") from None

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def check(self, node_types: set[str]) -> None:
        """The server answers and has every node type the workflow names."""
        info = self.get_json("/object_info")
        missing = sorted(t for t in node_types if t not in info)
        if missing:
            raise ServerError(f"the server has no node types {', '.join(missing)}; install the packs that provide "
                              "them (TroupeFidelity comes with ComfyUI-Troupe) and restart it")

    def upload(self, path: Path) -> str:
        """Upload an image to the input folder under a name derived from its content; returns that name."""
        data = path.read_bytes()
        name = f"troupe_bench_{hashlib.sha1(data).hexdigest()[:16]}{path.suffix.lower()}"
        boundary = uuid.uuid4().hex
        body = b"".join([
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n",
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n".encode(),
            f"--{boundary}--\r\n".encode(),
        ])
        out = json.loads(self._request("/upload/image", body,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{out['subfolder']}/{out['name']}" if out.get("subfolder") else out["name"]

    def queue(self, graph: dict) -> str:
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        try:
            out = json.loads(self._request("/prompt", body, {"Content-Type": "application/json"}))
        except ServerError as e:
            raise ServerError(f"the server refused the workflow: {e}") from None
        if out.get("node_errors"):  # ComfyUI still runs the outputs that validated: not the ones we need
            errors = "; ".join(f"node {nid} ({err.get('class_type')}): "
                               + ", ".join(e.get("details") or e.get("message", "") for e in err.get("errors", []))
                               for nid, err in out["node_errors"].items())
            raise ServerError(f"the server refused the workflow: {errors}")
        return out["prompt_id"]

    def wait(self, prompt_id: str) -> dict:
        """Poll /history until the prompt finished; the history entry, or ServerError with the node's error."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            status = (entry or {}).get("status", {})
            if entry and (status.get("completed") or status.get("status_str") in ("success", "error")):
                if status.get("status_str") == "error":
                    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = "; ".join(f"{e.get('node_type')}: {e.get('exception_message', '').strip()}"
                                       for e in errors) or json.dumps(status)[:2000]
                    raise ServerError(f"the prompt failed: {detail}")
                return entry
            time.sleep(self.poll)
        raise ServerError(f"prompt {prompt_id} did not finish within {self.timeout:.0f} s")

    def download(self, image: dict, dest: Path) -> Path:
        """Save an image listed in a history entry (filename, subfolder, type) to ``dest``."""
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(self._request(f"/view?{query}"))
        tmp.replace(dest)
        return dest
