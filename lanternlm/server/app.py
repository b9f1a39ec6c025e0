"""The OpenAI-compatible HTTP server, wired together: the engine's lifespan, the front gate (guard.py), one
error path (errors.py), the routers (routes/) and the built-in web page. It never touches tensors: requests
become token ids and SamplingParams, the engine turns them into Events, and the routes turn those into
OpenAI-shaped JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..engine import Engine
from .errors import install_error_handlers
from .guard import Guard
from .routes import chat, completions, embeddings, lantern, rag, service, tokens
from .state import ServedModel, ServerConfig, ServerState

__all__ = ["ServedModel", "ServerConfig", "create_app"]

WEB = Path(__file__).parent / "web"


def create_app(llm, config: ServerConfig, embed_main: bool = False, pooling: str | None = None,
               embedding_models: tuple[ServedModel, ...] = ()) -> FastAPI:
    """`llm` is the main model (-m): a decoder gets the engine; `embed_main` also serves its embeddings
    (an encoder always does). `embedding_models` are served beside it for /v1/embeddings."""
    main = ServedModel(config.served_name, llm, config.aliases,
                       embedding=embed_main or getattr(llm, "kind", "generate") == "embed", pooling=pooling)
    state = ServerState(llm, config, models=[main, *embedding_models])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = None
        if main.generates:
            engine = Engine(llm.model, llm.tokenizer, context=config.context, max_batch=config.max_batch,
                            max_queue=config.max_queue, prefill_chunk=config.prefill_chunk, device=llm.device,
                            observer=state.metrics.observe, kv_cache_bytes=config.kv_cache_bytes,
                            kv_dtype=getattr(llm, "kv_dtype", None),
                            prefix_caching=config.prefix_caching)
            state.engine = engine.start()
        yield
        if engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="Lantern", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for a local model, served by Lantern.")
    app.state.lantern = state
    install_error_handlers(app)
    for module in (chat, completions, embeddings, tokens, service, lantern, rag):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    async def page():
        """The built-in web page: chat with per-token probabilities, model page, tokenizer playground."""
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    routers = [module.router for module in (chat, completions, embeddings, tokens, service, lantern, rag)]
    paths = {getattr(route, "path", None) for route in [*app.routes, *(r for rt in routers for r in rt.routes)]}
    app.add_middleware(Guard, api_keys=config.api_keys, max_body_bytes=config.max_body_bytes,
                       public_metrics=config.public_metrics, routes=paths,
                       count=lambda route, status: state.metrics.requests.labels(route, str(status)).inc())
    return app
