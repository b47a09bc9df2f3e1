"""The HTTP application: OpenAI-compatible `/v1/completions` with sessions (FastAPI).

    POST   /v1/sessions              -> {"id": "sess-...", "object": "session"}
    DELETE /v1/sessions/{id}
    POST   /v1/completions           {"prompt", "max_tokens", "temperature", "top_p", "stop",
                                      "stream", "seed", "session"} -> a text_completion, or with
                                      "stream": true server-sent events ending in "data: [DONE]"
    GET    /v1/models, /health

`session` is memlm's extension of the OpenAI request: the completion continues that session's
stream from its memory. Errors answer 4xx with {"error": {"message", "type", "code"}}: an empty
prompt, too many tokens, a bad field (400), an unknown session (404), one busy with another
request (409) or evicted (410). Requests of all clients are decoded together, step by step
(memlm.serve.engine: those at one stream position share a forward).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from memlm.serve.engine import Completion, Engine
from memlm.serve.sessions import SessionError, SessionStore


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    session: str | None = None


class BadRequest(Exception):
    pass


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(engine: Engine, sessions: SessionStore, model_name: str = "memlm", max_tokens: int = 2048) -> FastAPI:
    app = FastAPI(title="memlm", description=__doc__)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error(400, fields or "invalid request")

    @app.exception_handler(BadRequest)
    async def bad(_: Request, exc: BadRequest):
        return error(400, str(exc))

    @app.exception_handler(SessionError)
    async def session_error(_: Request, exc: SessionError):
        return error(exc.status, str(exc), "session_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "sessions": len(sessions), "session_bytes": sessions.bytes}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "memlm"}]}

    @app.post("/v1/sessions")
    async def new_session():
        return {"id": sessions.create(), "object": "session"}

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        sessions.delete(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        prompt = check(request, max_tokens)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        session = sessions.acquire(request.session) if request.session is not None else None
        result = Completion()
        pieces = engine.complete(prompt, request.max_tokens, request.temperature,
                                 request.top_p if request.top_p < 1 else None, stop, request.seed,
                                 session.state if session is not None else None, result)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def finish() -> None:
            if session is not None:
                sessions.release(session, result.state, result.prompt_tokens + result.completion_tokens)

        if request.stream:
            def events() -> Iterator[str]:
                try:
                    for piece in pieces:
                        chunk = {**meta, "choices": [{"text": piece, "index": 0, "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    last = {**meta, "choices": [{"text": "", "index": 0, "finish_reason": result.finish_reason}],
                            "usage": usage(result), **session_field(session)}
                    yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
                finally:
                    pieces.close()
                    finish()
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            text = await run_in_threadpool(lambda: "".join(pieces))
        finally:
            finish()
        return {**meta, "choices": [{"text": text, "index": 0, "finish_reason": result.finish_reason}],
                "usage": usage(result), **session_field(session)}

    return app


def check(request: CompletionRequest, max_tokens: int) -> str:
    """The request's prompt, or BadRequest for what the schema cannot say."""
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest(f"prompt: one prompt per request, got {len(prompt)}")
        prompt = prompt[0]
    if not prompt:
        raise BadRequest("prompt: empty")
    if request.max_tokens > max_tokens:
        raise BadRequest(f"max_tokens: {request.max_tokens} exceeds this server's limit of {max_tokens}")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise BadRequest("stop: up to 4 non-empty strings")
    return prompt


def usage(result: Completion) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def session_field(session) -> dict:
    return {"session": session.id} if session is not None else {}
