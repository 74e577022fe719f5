"""GET /: a page to try the detector in a browser (service/web/index.html), unless RTMDET_WEB_UI=false.

The page is one static file that calls the API like any client (POST /detect, or the model server's
/v1/models/{name}/detect when GET /v1/models answers), so it holds no data and is served without the API
key; the key is typed into the page and sent as a bearer header on each call.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from service.settings import ServiceSettings

PAGE = Path(__file__).resolve().parent / "web" / "index.html"
CONFIG_SLOT = "/*RTMDET_CONFIG*/null"  # where the page reads the server's settings
# Scripts, styles and images only from the page itself; calls (and so the key) only to this origin.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' blob: data:; media-src 'self' blob: mediastream:; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def render_page(settings: ServiceSettings) -> str:
    config = {"apiKeyRequired": settings.api_key_value() is not None, "scoreThreshold": settings.score_threshold,
              "maxUploadBytes": settings.max_upload_bytes}
    html = PAGE.read_text(encoding="utf-8")
    if CONFIG_SLOT not in html:
        raise RuntimeError(f"{PAGE} lost its config slot {CONFIG_SLOT!r}")
    return html.replace(CONFIG_SLOT, json.dumps(config))


def web_ui_router(settings: ServiceSettings) -> APIRouter:
    """The page's route; no routes (so GET / is 404) when `settings.web_ui` is off."""
    router = APIRouter()
    if not settings.web_ui:
        return router
    html = render_page(settings)

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=HEADERS)

    return router
