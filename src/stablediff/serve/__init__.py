"""`stablediff serve`: an HTTP server for generation, with a native JSON API and an
AUTOMATIC1111-compatible subset (docs/serve.md).

Modules, one concept each: `config` (the settings), `security` (API key, Host allow-list, size
caps, upload decoding), `store` (jobs in SQLite), `preview` (the cheap latent -> RGB preview),
`models` (the models a server may load), `jobs` (queue, workers, progress, cancel), `api` (native
routes), `a1111` (A1111's routes, translated onto the native jobs), `app` (the FastAPI app factory
and `run`). FastAPI and uvicorn come with the `serve` extra.
"""

from stablediff.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def create_app(config: ServeConfig):
    from stablediff.serve.app import create_app as _create_app

    return _create_app(config)


def run(config: ServeConfig) -> None:
    from stablediff.serve.app import run as _run

    _run(config)
