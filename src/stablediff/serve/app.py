"""The FastAPI app factory and the uvicorn runner."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from stablediff.serve import a1111, api
from stablediff.serve.config import ServeConfig
from stablediff.serve.jobs import JobManager
from stablediff.serve.security import RequestError, SecurityMiddleware
from stablediff.version import __version__

# The web page: three files in the package, served by name from this table only (no request path
# reaches the file system). They hold no secrets, so they need no API key (the page asks for it).
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_PATHS = frozenset({"/", *(f"/static/{name}" for name in STATIC_FILES)})
PAGE_HEADERS = {
    # no inline script or style, nothing from elsewhere; images may be data: (previews) or blob: URLs
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def create_app(config: ServeConfig, manager: JobManager | None = None) -> FastAPI:
    """The app for ``config`` (checked first). Loads the model and queues again any job a previous
    run left unfinished; the workers stop when the app's lifespan ends."""
    config.check()
    manager = manager or JobManager(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        manager.shutdown()

    app = FastAPI(title="stablediff", version=__version__, lifespan=lifespan)
    app.state.manager = manager
    app.state.config = config
    app.add_middleware(SecurityMiddleware, config=config, public_paths=PAGE_PATHS)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise RequestError(404, f"no static file {name!r}")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    app.include_router(api.router)
    app.include_router(a1111.router)
    return app


def run(config: ServeConfig, app: FastAPI | None = None) -> None:
    """Serve until interrupted (uvicorn; no proxy headers are trusted)."""
    import uvicorn

    uvicorn.run(app or create_app(config), host=config.host, port=config.port, proxy_headers=False, log_level="info")
