"""The FastAPI app factory and the uvicorn runner."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from stablediff.serve import a1111, api
from stablediff.serve.config import ServeConfig
from stablediff.serve.jobs import JobManager
from stablediff.serve.security import RequestError, SecurityMiddleware
from stablediff.version import __version__


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
    app.add_middleware(SecurityMiddleware, config=config)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)

    app.include_router(api.router)
    app.include_router(a1111.router)
    return app


def run(config: ServeConfig, app: FastAPI | None = None) -> None:
    """Serve until interrupted (uvicorn; no proxy headers are trusted)."""
    import uvicorn

    uvicorn.run(app or create_app(config), host=config.host, port=config.port, proxy_headers=False, log_level="info")
