"""Node help pages (web/docs/<NodeId>.md, shown by current frontends in the node library), search aliases where
the host supports them, and the registry metadata (issue 15, item 7)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import tomllib
from fixtures.tiny_models import ensure_comfy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schemas():
    ensure_comfy()
    from comfyui_troupe.nodes import NODES
    from comfyui_troupe.nodes.paths import register_model_folders

    register_model_folders()
    return [cls.define_schema() for cls in NODES]


def test_every_node_has_a_help_page_naming_its_inputs(schemas):
    missing = []
    for s in schemas:
        page = ROOT / "web" / "docs" / f"{s.node_id}.md"
        if not page.is_file():
            missing.append(f"{s.node_id}: no web/docs/{s.node_id}.md")
            continue
        text = page.read_text()
        assert text.startswith("# "), page
        missing += [f"{s.node_id}: input '{i.id}' not described" for i in s.inputs if f"`{i.id}`" not in text]
    assert not missing, "\n".join(missing)


def test_search_aliases_only_where_the_host_has_the_field(schemas):
    from comfy_api.latest import io

    from comfyui_troupe.nodes.search import SUPPORTED, aliases

    assert SUPPORTED == ("search_aliases" in {f.name for f in dataclasses.fields(io.Schema)})
    layout = next(s for s in schemas if s.node_id == "TroupeLayout")
    if SUPPORTED:
        assert "box editor" in layout.search_aliases
        assert aliases("x") == {"search_aliases": ["x"]}
    else:
        assert aliases("x") == {}


def test_registry_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["Icon"].startswith("https://") and comfy["requires-comfyui"]
    urls = project["project"]["urls"]
    assert {"Repository", "Documentation", "Issues"} <= set(urls)
    ignore = (ROOT / ".comfyignore").read_text().split()
    for path in ("tests/", "scripts/", "benchmarks/", ".ci/", "test-artifacts/"):
        assert path in ignore, path


def test_every_output_has_a_tooltip(schemas):
    missing = [f"{s.node_id}: output '{o.display_name}'" for s in schemas
               for o in s.outputs or [] if not getattr(o, "tooltip", None)]
    assert not missing, "\n".join(missing)
