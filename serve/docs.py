"""``/docs``: Swagger UI served from this process (the ``swagger-ui-bundle`` package, Apache-2.0),
so the page works without internet access. FastAPI's own /docs loads its assets from a CDN."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"


def install(app: FastAPI) -> None:
    """Serve Swagger UI's files under /docs-assets and the page at /docs; without the package, no /docs."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return
    app.mount(ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png")

    app.add_api_route("/docs", docs, include_in_schema=False)
