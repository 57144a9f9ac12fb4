"""The browser fixture: one Chromium page with the real ComfyUI frontend for every browser test."""
from __future__ import annotations

import shutil

import pytest
import requests
from playwright import sync_api

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LOAD_TIMEOUT_MS = 180_000  # the frontend takes ~25 s on a 2-core CI machine


@pytest.fixture(scope="session")
def page(comfy_server):
    """One Chromium page (shared by the browser tests) with the frontend loaded, first-run dialogs off."""
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is missing: `make host` installs it")
    # The template browser opens on a first start unless the tutorial counts as done.
    requests.post(f"{comfy_server.url}/settings", json={"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False},
                  timeout=30).raise_for_status()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 950})
        errors: list[str] = []  # uncaught errors thrown from the pack's scripts

        def on_error(e) -> None:
            text = f"{e.message}\n{e.stack or ''}"
            if "troupe" in text.lower():
                errors.append(text)

        pg.on("pageerror", on_error)
        pg.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        pg.goto(comfy_server.url)
        pg.wait_for_function(
            "() => window.app?.graph && window.app.canvas && window.LiteGraph?.registered_node_types?.TroupeLayout"
            " && app.extensionManager && app.extensions?.some(e => e.name === 'Troupe.LayoutEditor')",
            timeout=LOAD_TIMEOUT_MS)
        pg.troupe_errors = errors
        yield pg
        browser.close()
