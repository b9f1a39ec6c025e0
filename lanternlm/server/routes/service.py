"""The service routes: GET /health for probes, GET /metrics for Prometheus (behind the API key unless the
server runs with --public-metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..state import current

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = current(request)
    eng = state.engine
    if state.models[0].generates and (eng is None or eng.dead):  # an embedding-only server has no engine
        if eng is not None:
            state.dead_reported.set()
        return JSONResponse({"status": "dead", "error": eng.dead if eng else "not started"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request):
    state = current(request)
    if state.engine is not None:
        snap = state.engine.snapshot()
        state.metrics.queue_depth.set(snap.waiting)
        state.metrics.running.set(snap.running)
        state.metrics.steps.inc(snap.steps_total - state.steps_seen)  # the engine counts; the metric mirrors it
        state.steps_seen = snap.steps_total
        m = state.metrics
        m.preemptions.set(snap.preemptions_total)
        m.kv_capacity.set(snap.kv_blocks_total * snap.kv_bytes_per_block)
        m.kv_used.set(snap.kv_blocks_used * snap.kv_bytes_per_block)
        m.kv_cached.set(snap.kv_blocks_cached * snap.kv_bytes_per_block)
        m.prefix_queries.set(snap.prefix_query_tokens)
        m.prefix_hits.set(snap.prefix_hit_tokens)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
