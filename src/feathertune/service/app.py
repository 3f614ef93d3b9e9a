"""The HTTP API: OpenAI's files, fine-tuning jobs, models and chat completions, plus the dashboard.

Every /v1 route needs `Authorization: Bearer <key>` (compared in constant time). Every error,
whatever raised it (a bad body, an unknown id, a route that does not exist), is answered in
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises
its own typed exceptions (AuthenticationError, NotFoundError, BadRequestError, ...).
"""

from __future__ import annotations

import hmac
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from feathertune.errors import ConfigError
from feathertune.files import atomic_write
from feathertune.service import jobs
from feathertune.service.openai_objects import (
    ApiError,
    checkpoint_object,
    error_body,
    event_object,
    file_object,
    job_object,
    model_object,
    not_found,
    page,
)
from feathertune.service.paths import DataDir, display_name, new_id
from feathertune.service.store import Store

DASHBOARD = Path(__file__).with_name("dashboard.html")
PURPOSES = ("fine-tune", "fine-tune-results", "assistants", "batch", "vision", "user_data", "evals")
STATUS_WAIT_S = 10.0  # cancel / pause of a running job: how long the answer waits for it to stop
CHUNK = 1 << 20


# -- request bodies (they also make the OpenAPI schema that schemathesis fuzzes) ------------------
def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where in a decoded JSON value a string holds a lone UTF-16 surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = (_lone_surrogate(key, f"a key of {where or 'the body'}")
                     or _lone_surrogate(item, f"{where}.{key}" if where else key))
            if found:
                return found
    elif isinstance(value, list):
        return next((f for i, item in enumerate(value) if (f := _lone_surrogate(item, f"{where}[{i}]"))), None)
    return None


def _unicode_only(cls, data: Any) -> Any:
    """JSON can escape a lone surrogate ("\\ud800"), which is no Unicode text: SQLite, the tokenizer
    and the JSON answer cannot encode it (a 500). A 400 that says where, instead."""
    where = _lone_surrogate(data)
    if where is not None:
        raise ValueError(f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not Unicode text")
    return data


# strict: JSON's types as the schema says them, as OpenAI takes them: "seed": true or "max_tokens":
# "5" is a 400, not silently 1 and 5.
class JobBody(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), strict=True)
    unicode_only = model_validator(mode="before")(_unicode_only)
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None
    integrations: list[Any] | None = None
    feathertune: dict[str, Any] | None = Field(None, description="feathertune's own training options: method, "
                                                                 "adapter, quantize, train, data, eval")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), strict=True)
    unicode_only = model_validator(mode="before")(_unicode_only)
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1, le=1)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: what every 4xx and 5xx answer is (declared so in the OpenAPI schema,
    in place of FastAPI's 422, which this app never sends: a bad body is a 400)."""
    error: ErrorDetail


ERRORS = {"4XX": {"model": ErrorResponse, "description": "An error in OpenAI's shape"},
          "5XX": {"model": ErrorResponse, "description": "An error in OpenAI's shape"}}


def create_app(*, store: Store, data: DataDir, models: dict[str, str], api_keys: list[str], engine=None,
               max_upload_bytes: int = 512 << 20) -> FastAPI:
    """The service's ASGI app. `models`: base name → source (embedded name or model directory);
    `engine`: a chat.ChatEngine (None: chat completions answer 503)."""
    app = FastAPI(title="feathertune", version="1", description="OpenAI-compatible fine-tuning on your own machine",
                  responses=ERRORS)
    bearer = HTTPBearer(auto_error=False)
    keys = [k.encode() for k in api_keys]

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = (credentials.credentials if credentials else "").encode()
        if not any(hmac.compare_digest(given, key) for key in keys):  # constant time, whatever the key
            raise ApiError(401, "Incorrect API key provided. Pass the key the server printed at start "
                           "(or FEATHERTUNE_API_KEY) as `Authorization: Bearer <key>`.", code="invalid_api_key")

    _install_error_handlers(app)
    _limit_uploads(app, max_upload_bytes)
    auth = [Depends(authorized)]

    _file_routes(app, auth, store, data, max_upload_bytes)
    _job_routes(app, auth, store, data, models)
    _model_routes(app, auth, store, models, engine)
    _chat_routes(app, auth, store, data, models, engine)

    # -- dashboard --------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8") if DASHBOARD.is_file() else "<h1>feathertune</h1>")

    return app



def _file_routes(app: FastAPI, auth: list, store: Store, data: DataDir, max_upload_bytes: int) -> None:
    """POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content."""
    @app.post("/v1/files", dependencies=auth)
    def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose={purpose!r}; use one of {', '.join(PURPOSES)}", param="purpose")
        file_id = new_id("file")
        filename = display_name(file.filename)
        stored = data.stored_name(file_id, filename)
        target = data.file(stored)
        size = _copy_limited(file, target, max_upload_bytes)
        row = store.insert("files", {"id": file_id, "filename": filename, "purpose": purpose, "bytes": size,
                                     "stored_name": stored})
        return file_object(row)

    @app.get("/v1/files", dependencies=auth)
    def list_files(purpose: str | None = None, after: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                   order: Literal["asc", "desc"] = "desc") -> dict:
        rows, more = store.page("files", after=after, limit=limit, where={"purpose": purpose} if purpose else None,
                                newest_first=order == "desc")
        return page([file_object(r) for r in rows], more)

    def file_row(file_id: str) -> dict:
        return _existing(store, "files", file_id, "file", "file_id")

    @app.get("/v1/files/{file_id}", dependencies=auth)
    def get_file(file_id: str) -> dict:
        return file_object(file_row(file_id))

    @app.delete("/v1/files/{file_id}", dependencies=auth)
    def delete_file(file_id: str) -> dict:
        row = file_row(file_id)
        store.delete("files", file_id)
        data.file(row["stored_name"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content", dependencies=auth,
             responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"}})
    def file_content(file_id: str):
        row = file_row(file_id)
        return FileResponse(data.file(row["stored_name"]), media_type="application/octet-stream",
                            filename=row["filename"])


def _job_routes(app: FastAPI, auth: list, store: Store, data: DataDir, models: dict[str, str]) -> None:
    """/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events, checkpoints."""
    @app.post("/v1/fine_tuning/jobs", dependencies=auth)
    def create_job(body: JobBody) -> dict:
        values = body.model_dump(exclude_unset=True)
        named = {values.get("training_file"), values.get("validation_file")} - {None}
        files = {f: r for f in named if (r := store.get("files", f)) is not None}
        row = jobs.new_job_row(values, job_id=new_id("ftjob"), models=set(models), files=files)
        jobs.check_file_kinds(row, files, lambda file: data.file(file["stored_name"]))  # dpo: pairs, and only dpo
        row = store.insert("jobs", row)
        store.add_event(row["id"], f"Created fine-tuning job: {row['id']}")
        return job_object(store.get("jobs", row["id"]))

    @app.get("/v1/fine_tuning/jobs", dependencies=auth)
    def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> dict:
        rows, more = store.page("jobs", after=after, limit=limit)
        return page([job_object(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=auth)
    def get_job(job_id: str) -> dict:
        return job_object(_job_row(store, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=auth)
    def cancel_job(job_id: str) -> dict:
        return _stop_job(store, job_id, "cancel")

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause", dependencies=auth)
    def pause_job(job_id: str) -> dict:
        return _stop_job(store, job_id, "pause")

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume", dependencies=auth)
    def resume_job(job_id: str) -> dict:
        row = _job_row(store, job_id)
        if not store.update_job(job_id, when_status=("paused",), status="queued"):
            raise ApiError(400, f"Only a paused job can resume; this one is {row['status']!r}",
                           param="fine_tuning_job_id", code="invalid_job_status")
        store.add_event(job_id, "The job was resumed; it continues from its last checkpoint")
        return job_object(_job_row(store, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=auth)
    def job_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=10000)) -> dict:
        _job_row(store, job_id)
        rows, more = store.page("events", after=after, limit=limit, where={"job_id": job_id})
        return page([event_object(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", dependencies=auth)
    def job_checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100)) -> dict:
        _job_row(store, job_id)
        rows, more = store.page("checkpoints", after=after, limit=limit, where={"job_id": job_id})
        return page([checkpoint_object(r) for r in rows], more)


def _model_routes(app: FastAPI, auth: list, store: Store, models: dict[str, str], engine) -> None:
    """GET /v1/models, GET/DELETE /v1/models/{id}: the bases served, and every fine-tuned model and checkpoint."""
    started = int(time.time())

    @app.get("/v1/models", dependencies=auth)
    def list_models() -> dict:
        bases = [model_object(name, started) for name in models]
        tuned = [model_object(r["id"], r["created_at"], "user") for r in store.all("models")]
        return {"object": "list", "data": bases + tuned}

    @app.get("/v1/models/{model_id}", dependencies=auth)
    def get_model(model_id: str) -> dict:
        row = _model_row(store, models, model_id)
        return model_object(model_id, started) if row is None else model_object(row["id"], row["created_at"], "user")

    @app.delete("/v1/models/{model_id}", dependencies=auth)
    def delete_model(model_id: str) -> dict:
        if _model_row(store, models, model_id) is None:
            raise ApiError(403, f"{model_id!r} is a base model; only fine-tuned models can be deleted",
                           param="model", code="model_not_deletable")
        store.delete("models", model_id)
        if engine is not None:
            engine.forget(model_id)
        return {"id": model_id, "object": "model", "deleted": True}


def _chat_routes(app: FastAPI, auth: list, store: Store, data: DataDir, models: dict[str, str], engine) -> None:
    """POST /v1/chat/completions, plain or streamed (server-sent events)."""
    @app.post("/v1/chat/completions", dependencies=auth,
              responses={200: {"content": {"text/event-stream": {}}, "description": "A completion, or its chunks "
                                                                                   "as server-sent events"}})
    def chat_completions(body: ChatBody):
        if engine is None:
            raise ApiError(503, "this server runs no chat engine (started with --worker?)", type="server_error")
        request = _chat_request(body, _model_row(store, models, body.model), data, models)
        completion_id, created = "chatcmpl-" + new_id("file")[5:], int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            pieces = engine.stream(request)
            first = next(pieces)  # errors (a prompt too long) surface here, as a status, not mid-stream
            return StreamingResponse(_sse(body.model, completion_id, created, first, pieces, include_usage),
                                     media_type="text/event-stream")
        result = engine.complete(request)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "finish_reason": result.finish_reason, "logprobs": None,
                             "message": {"role": "assistant", "content": result.text, "refusal": None}}],
                "usage": _usage(result)}


def _stop_job(store: Store, job_id: str, action: str) -> dict:
    """Cancel or pause: a waiting job at once; a running one is asked (its worker stops the run at a
    checkpoint after the current step) and the answer waits a little for it to have stopped."""
    row = _job_row(store, job_id)
    target = {"cancel": "cancelled", "pause": "paused"}[action]
    # A job whose files are still being validated can be cancelled, not paused: it would resume
    # into training with its files unchecked.
    waiting = ("validating_files", "queued", "paused") if action == "cancel" else ("queued",)
    finished = int(time.time()) if action == "cancel" else None
    if store.update_job(job_id, when_status=waiting, status=target, worker=None, finished_at=finished):
        store.add_event(job_id, f"The job was {target}")
    elif store.update_job(job_id, when_status=("running",), requested=action):
        deadline = time.time() + STATUS_WAIT_S  # the run stops after its step, at a checkpoint
        while time.time() < deadline and _job_row(store, job_id)["status"] == "running":
            time.sleep(0.1)
    else:
        raise ApiError(400, f"Cannot {action} a job whose status is {row['status']!r}", param="fine_tuning_job_id",
                       code="invalid_job_status")
    return job_object(_job_row(store, job_id))


def _job_row(store: Store, job_id: str) -> dict:
    return _existing(store, "jobs", job_id, "fine-tuning job", "fine_tuning_job_id")


def _existing(store: Store, table: str, row_id: str, kind: str, param: str) -> dict:
    """The row of an id that must exist, or a 404 in OpenAI's shape."""
    row = store.get(table, row_id)
    if row is None:
        raise not_found(kind, row_id, param)
    return row


def _model_row(store: Store, models: dict[str, str], model_id: str) -> dict | None:
    """A fine-tuned model's row, None for a base model this server serves, or a 404."""
    row = store.get("models", model_id)
    if row is None and model_id not in models:
        raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
    return row


def _copy_limited(upload: UploadFile, target: Path, limit: int) -> int:
    """Stream the upload to `target`, atomically (files.atomic_write); over `limit` bytes: nothing
    kept, 413."""
    size = 0

    def stream(tmp: str) -> None:
        nonlocal size
        with open(tmp, "wb") as out:
            while chunk := upload.file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                out.write(chunk)

    atomic_write(target, stream)
    return size


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The file is larger than this server's limit of {limit // (1 << 20)} MB (--max-upload-mb)",
                    param="file", code="file_too_large")


def _chat_request(body: ChatBody, row: dict | None, data: DataDir, models: dict[str, str]):
    from feathertune.service.chat import ChatRequest

    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):  # content parts: the text ones, joined
            content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    base = row["base"] if row else body.model
    if base not in models:
        raise ApiError(404, f"the base model {base!r} of {body.model!r} is not served here", param="model",
                       code="model_not_found")
    adapter = data.inside(row["adapter"]) if row else None
    return ChatRequest(base=base, adapter=adapter, adapter_key=body.model if row else "", messages=messages,
                       max_tokens=body.max_completion_tokens or body.max_tokens,
                       temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=body.seed)


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _sse(model: str, completion_id: str, created: int, first, rest: Iterator, include_usage: bool) -> Iterator[str]:
    """Server-sent events as OpenAI streams them: a role chunk, content chunks, a finish chunk,
    optionally a usage chunk, then [DONE]."""
    from feathertune.service.chat import ChatResult

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in _chain(first, rest):
        if isinstance(piece, ChatResult):
            yield chunk({}, piece.finish_reason)
            if include_usage:
                yield chunk({}, usage=_usage(piece), choices=False)
        elif piece:
            yield chunk({"content": piece})
    yield "data: [DONE]\n\n"


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, exc: ConfigError):
        return JSONResponse(error_body(str(exc), "invalid_request_error", None, "invalid_request"), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = "Not found: no such route. The API is under /v1 (files, fine_tuning/jobs, models, chat/completions)."
        # Keep the exception's headers: a 405 must say `Allow` (RFC 9110).
        return JSONResponse(error_body(message, kind, None, None), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a parameter
            position, reason = first["loc"][-1], (first.get("ctx") or {}).get("error", "")
            message = f"The body is not valid JSON (at character {position}{': ' + reason if reason else ''})"
            return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_json"), status_code=400)
        where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        param = ".".join(where) or None
        reason = first.get("msg", "the body is not valid").removeprefix("Value error, ")  # a validator's ValueError
        message = f"Invalid request: {param + ': ' if param else ''}{reason}"
        if param is None and first.get("type") in ("missing", "model_attributes_type", "dict_type"):  # no object
            message = "Invalid request: the body must be a JSON object (Content-Type: application/json)"
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_request"
        return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        # The trace goes to the server's log; the answer names the kind of failure only, since the
        # text of an unexpected exception may hold the server's paths.
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}) while serving {request.url.path}; "
                                       f"the server's log has the details", "server_error"), status_code=500)


def _limit_uploads(app: FastAPI, limit: int) -> None:
    """Refuse an upload over `limit` (413): by its Content-Length before reading it, or, sent without
    one (chunked), once the bytes received pass it, so that nothing past the limit is read or spooled
    to disk by the multipart parser. upload() counts the file itself again as it copies it."""
    allowed = limit + (64 << 10)  # a little over: the multipart envelope
    refusal = _too_large(limit).body()

    # Plain ASGI: BaseHTTPMiddleware cannot stop the app reading the body. (FastAPI's route-level
    # max_body_size answers a 413 as text/plain, not in OpenAI's shape.)
    class UploadLimit:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/files":
                return await self.inner(scope, receive, send)
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > allowed:
                return await JSONResponse(refusal, status_code=413)(scope, receive, send)
            received, over = 0, False

            async def counted():
                nonlocal received, over
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > allowed:  # the app reads no further; its answer gives way to the 413
                        over = True
                        return {"type": "http.disconnect"}
                return message

            async def unless_over(message):
                if not over:
                    await send(message)

            await self.inner(scope, counted, unless_over)
            if over:
                await JSONResponse(refusal, status_code=413)(scope, receive, send)

    app.add_middleware(UploadLimit)
