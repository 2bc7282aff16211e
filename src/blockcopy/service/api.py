"""The HTTP resources: the CLI's commands as JSON over HTTP/1.1, errors as problem details.

FastAPI (on Starlette, with pydantic) gives request validation (unknown fields, wrong types) and the
OpenAPI document from the same declarations; the repository keeps that document in
``docs/openapi.json`` and a test checks it matches. Bodies of jobs and domains are the CLI's
``--json`` views (:mod:`blockcopy.views`): one set of field names for scripts and apps.

Errors are ``application/problem+json`` (RFC 9457) with ``detail`` the CLI's message, ``error`` the
exception class and ``exit_code`` the CLI's exit status for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Literal

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from blockcopy import __version__, nodes, views
from blockcopy.errors import (
    BlockcopyError,
    DomainBusy,
    GuestLeftPaused,
    JournalError,
    MonitorBusy,
    MonitorError,
    NoListener,
    NotFound,
    NotReady,
    OperationFailed,
    QemuGone,
    RecoveryIncomplete,
    RequestConflict,
    TransitionStalled,
    UsageError,
)
from blockcopy.records import CopyRequest, Goal
from blockcopy.service.daemon import Daemon
from blockcopy.service.metrics import Metrics

#: Request bodies are small (a copy of 64 disks is a few KiB); larger ones are refused with 413.
MAX_BODY = 64 * 1024
#: An idle event stream sends a comment this often, so proxies and clients see it is alive.
KEEPALIVE = 15.0

_STATUS: list[tuple[type[BlockcopyError], int]] = [
    (NotFound, 404), (RequestConflict, 409), (NotReady, 409), (DomainBusy, 409), (OperationFailed, 409),
    (UsageError, 400), (JournalError, 503), (TransitionStalled, 504), (GuestLeftPaused, 503),
    (RecoveryIncomplete, 503), (QemuGone, 409), (NoListener, 409), (MonitorBusy, 409), (MonitorError, 502),
]



#: A token the CLI sends with a request that journals a pivot or finish, and with the keep-copying
#: of its interrupted wait: only the goal that request journaled is withdrawn.
ASKED_BY: Any = Query(None, max_length=64, pattern=r"^[0-9a-f]{1,64}$",
                      description="a token (hex) naming this request, for POST /v1/jobs/{job}/keep-copying")

def status_of(exc: BlockcopyError) -> int:
    return next((status for kind, status in _STATUS if isinstance(exc, kind)), 500)


def problem_document(status: int, title: str, detail: str, *, error: str = "UsageError",
                     exit_code: int = UsageError.exit_code, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem with the CLI's exception name and exit status (bad input unless said)."""
    return {"type": "about:blank", "title": title, "status": status, "detail": detail, "error": error,
            "exit_code": exit_code, **extra}


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(problem_document(status, title, detail, **extra), status_code=status,
                        media_type="application/problem+json")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttachBody(_Strict):
    name: str = Field(min_length=1, max_length=200, description="the domain's name in blockcopy")
    qmp_socket: str = Field(min_length=1, max_length=4000, description="QMP unix socket reserved for blockcopy")


class Target(_Strict):
    disk: str = Field(min_length=1, max_length=1000, description="qdev id, drive id or node name")
    destination: str = Field(min_length=1, max_length=4000, description="absolute path of DEST")


class Owner(_Strict):
    uid: int = Field(ge=0, le=2**32 - 2)
    gid: int = Field(ge=0, le=2**32 - 2)


class CopyBody(_Strict):
    """``blockcopy copy``'s options; the same defaults."""

    domain: str = Field(min_length=1, max_length=200)
    disks: list[Target] = Field(min_length=1, max_length=64, description="all disks of one job pivot together")
    goal: Literal["copy", "pivot", "finish"] = Field("copy", description="copy: stay ready until told; pivot or "
                                                     "finish: carried out once ready (and after a restart)")
    format: str | None = Field(None, max_length=20, description="qcow2 or raw (default: the source's)")
    shallow: bool = False
    reuse_external: bool = False
    bandwidth_mib: float | None = Field(None, gt=0, le=1e9, description="copy speed limit, MiB/s")
    buf_size: int | None = Field(None, gt=0, le=2**40, description="mirror buffer, bytes")
    mode: str = Field("write-blocking", max_length=20, description="write-blocking or background")
    dest_options: list[str] = Field(default_factory=list, max_length=32, description="KEY=VALUE node options of "
                                    "DEST, as `--dest-option`")
    owner: Owner | None = None
    file_mode: int | None = Field(None, ge=0, le=0o777, description="permission bits of a created DEST")
    cluster_size: int | None = Field(None, gt=0, le=2**31)
    preallocation: str | None = Field(None, max_length=20)
    page_cache_fill: bool = Field(False, description="fill a DEST that is to be O_DIRECT through the host's page "
                                  "cache and reopen it O_DIRECT once ready, as `--page-cache-fill`; only for goal "
                                  "pivot or finish (another job is told so in its warnings and journaled without it)")
    request_id: str | None = Field(None, min_length=1, max_length=200, description="idempotency key (or the "
                                   "Idempotency-Key header): the same request again returns the same job")


class SpeedBody(_Strict):
    bandwidth_mib: float = Field(ge=0, le=1e9, description="MiB/s; 0 removes the limit")


class Problem(BaseModel):
    """An error (RFC 9457 problem details), with the CLI's message and exit status."""

    type: str
    title: str
    status: int
    detail: str = Field(description="what went wrong and what to do: the CLI's message")
    error: str | None = Field(None, description="the exception class, e.g. NotReady, DomainBusy")
    exit_code: int | None = Field(None, description="the CLI's exit status for it")


_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": _PROBLEM} for status, text in (
        (400, "bad input (UsageError); malformed JSON"), (404, "unknown domain, job or route (NotFound)"),
        (409, "NotReady, DomainBusy, RequestConflict, OperationFailed; the VM is not running"),
        (413, "body too large"), (422, "a field is missing, unknown or of the wrong type"),
        (502, "QEMU refused or the QMP connection failed (MonitorError)"),
        (503, "the journal cannot be written, or a guest stays paused (GuestLeftPaused)"),
        (504, "QEMU did not carry a transition out in time (TransitionStalled)"))}


class AttachedDomain(BaseModel):
    domain: str
    qmp_socket: str
    attached_at: float
    qemu_pid: int | None


def create_app(daemon: Daemon, *, token: str | None = None, metrics: Metrics | None = None) -> FastAPI:
    """The application; ``token``: every request must carry ``Authorization: Bearer TOKEN`` (the TCP
    listener's; on the unix socket, the kernel names the peer instead)."""
    app = FastAPI(title="blockcopy", version=__version__, docs_url=None, redoc_url=None, responses=_ERRORS,
                  description="Live block copy of running QEMU VM disks, with a crash-safe pivot. "
                  "Job and domain bodies are the CLI's --json views.")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            document.setdefault("components", {}).setdefault("schemas", {})["Problem"] = Problem.model_json_schema()
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    metrics = metrics or Metrics(daemon)

    @app.exception_handler(BlockcopyError)
    async def blockcopy_error(_request: Request, exc: BlockcopyError) -> JSONResponse:
        return problem(status_of(exc), type(exc).__name__, str(exc), error=type(exc).__name__,
                       exit_code=exc.exit_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"where": ".".join(str(part) for part in e.get("loc", ())), "problem": str(e.get("msg", ""))}
                  for e in exc.errors()]
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        detail = "; ".join(f"{e['where']}: {e['problem']}" for e in errors[:5]) or "invalid request"
        if malformed:
            return problem(400, "Malformed JSON", f"the body is not valid JSON ({detail})")
        return problem(422, "Invalid request", detail, errors=errors)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        detail = {404: "no such resource; GET /openapi.json lists them",
                  405: "this resource does not take that method"}.get(exc.status_code, str(exc.detail))
        title = {404: "Not Found", 405: "Method Not Allowed", 413: "Request too large"}.get(exc.status_code, "Error")
        return problem(exc.status_code, title, detail)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        return problem(500, "Internal error", f"blockcopy failed unexpectedly: {exc!r}; the journal is unchanged "
                       "by this request unless a job says otherwise", error="InternalError", exit_code=1)

    app.add_middleware(_Guard, token=token)

    # --- service -----------------------------------------------------------------------------------

    @app.get("/v1/health", tags=["service"])
    async def health() -> dict[str, Any]:
        """Up (it serves only once every unfinished job was recovered), and the last event's sequence
        number (follow events from there)."""
        return {"status": "ok", "version": __version__,
                "domains": len(daemon.journal.domains()),
                "unfinished_jobs": len(daemon.journal.operations(unfinished=True)),
                "last_event": daemon.journal.last_event_seq(), "started_at": daemon.started_at}

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def get_metrics() -> Response:
        """Prometheus text format."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/recover", tags=["service"])
    async def recover(domain: str | None = Query(None, max_length=200), wait: bool = False) -> list[dict[str, Any]]:
        """Retry every unfinished job now (the daemon retries them by itself too); answered once no
        guest is held paused, or with ``wait`` once every journaled pivot, finish or abort has ended."""
        if domain is not None:
            daemon.manager._domain(domain)
        return [views.operation_view(op) for op in await daemon.recover(domain, wait=wait)]

    # --- domains -----------------------------------------------------------------------------------

    @app.get("/v1/domains", tags=["domains"])
    async def list_domains() -> list[AttachedDomain]:
        return [AttachedDomain(**views.domain_view(d)) for d in daemon.journal.domains()]

    @app.post("/v1/domains", tags=["domains"], status_code=201)
    async def attach(body: AttachBody) -> AttachedDomain:
        """Register a running QEMU by its QMP socket (the daemon keeps the connection)."""
        return AttachedDomain(**views.domain_view(await daemon.attach(body.name, body.qmp_socket)))

    @app.delete("/v1/domains/{name}", tags=["domains"])
    async def detach(name: str) -> dict[str, Any]:
        await daemon.detach(name)
        return {"domain": name, "detached": True}

    @app.get("/v1/domains/{name}/disks", tags=["domains"])
    async def disks(name: str) -> list[dict[str, Any]]:
        return [views.device_view(d) for d in await daemon.disks(name)]

    # --- jobs --------------------------------------------------------------------------------------

    @app.get("/v1/jobs", tags=["jobs"])
    async def list_jobs(domain: str | None = Query(None, max_length=200)) -> list[dict[str, Any]]:
        """Every job, as journaled (the daemon keeps the journal current)."""
        return [views.operation_view(op) for op in daemon.journal.operations(domain=domain)]

    @app.post("/v1/jobs", tags=["jobs"], status_code=201)
    async def create_job(body: CopyBody, response: Response,
                         idempotency_key: str | None = Header(None, max_length=200),
                         asked_by: str | None = ASKED_BY) -> dict[str, Any]:
        """Start a copy. With a request id (``Idempotency-Key`` or ``request_id``), sending the same
        request again returns the job it created (200, ``Idempotent-Replayed: true``) and starts
        nothing; another request under that id is refused (409)."""
        if idempotency_key is not None and body.request_id is not None and idempotency_key != body.request_id:
            raise UsageError("the Idempotency-Key header and request_id differ; send one of them")
        dest_options = nodes.parse_dest_options(body.dest_options)
        request = CopyRequest(
            domain=body.domain, targets=[(t.disk, t.destination) for t in body.disks], format=body.format,
            shallow=body.shallow, reuse_external=body.reuse_external, bandwidth_mib=body.bandwidth_mib,
            mode=body.mode, goal=Goal(body.goal), buf_size=body.buf_size, dest_options=dest_options,
            owner=(body.owner.uid, body.owner.gid) if body.owner else None, mode_bits=body.file_mode,
            cluster_size=body.cluster_size, preallocation=body.preallocation,
            page_cache_fill=body.page_cache_fill, client_key=idempotency_key or body.request_id)
        op, created = await daemon.copy(request, asked_by=asked_by)
        response.headers["Location"] = f"/v1/jobs/{op.id}"
        if not created:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
        return views.operation_view(op)

    @app.get("/v1/jobs/{job}", tags=["jobs"])
    async def get_job(job: str, log: bool = False) -> dict[str, Any]:
        """One job (by id or a unique prefix of 4+ characters); ``log``: with its journaled steps."""
        op = daemon.manager._operation(job)
        data = views.operation_view(op)
        if log:
            data["log"] = [{"at": s.at, "phase": s.phase, "note": s.note} for s in daemon.journal.steps(op.id)]
        return data

    @app.post("/v1/jobs/{job}/pivot", tags=["jobs"])
    async def pivot(job: str, wait: bool = False, asked_by: str | None = ASKED_BY) -> dict[str, Any]:
        """Switch the guest to the destinations (all disks together); returns the ended job.
        ``wait``: a job that is not ready yet is pivoted once ready (else 409)."""
        return views.operation_view(await daemon.conclude(job, Goal.PIVOT, wait=wait, asked_by=asked_by))

    @app.post("/v1/jobs/{job}/finish", tags=["jobs"])
    async def finish(job: str, wait: bool = False, asked_by: str | None = ASKED_BY) -> dict[str, Any]:
        """End the mirrors leaving consistent copies; the guest stays on the sources."""
        return views.operation_view(await daemon.conclude(job, Goal.FINISH, wait=wait, asked_by=asked_by))

    @app.post("/v1/jobs/{job}/abort", tags=["jobs"])
    async def abort(job: str) -> dict[str, Any]:
        """Cancel; the guest stays on the sources."""
        return views.operation_view(await daemon.conclude(job, Goal.ABORT, wait=True))

    @app.post("/v1/jobs/{job}/keep-copying", tags=["jobs"])
    async def keep_copying(job: str, asked_by: str | None = ASKED_BY) -> dict[str, Any]:
        """Withdraw a pivot or finish that has not begun: the job keeps copying (what the CLI does
        when a wait is interrupted). One under way runs to its end. ``asked_by``: only the goal
        that the request sent with this token journaled (the goal it replaced is put back)."""
        return views.operation_view(await daemon.keep_copying(job, asked_by=asked_by))

    @app.post("/v1/jobs/{job}/speed", tags=["jobs"])
    async def speed(job: str, body: SpeedBody) -> dict[str, Any]:
        """Change a copying job's speed limit (QEMU's block-job-set-speed), journaled first."""
        return views.operation_view(await daemon.set_speed(job, body.bandwidth_mib))

    # --- events ------------------------------------------------------------------------------------

    @app.get("/v1/events", tags=["events"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def events(request: Request, last_event_id: str | None = Header(None, max_length=20),
                     after: int | None = Query(None, ge=0, le=2**62),
                     job: str | None = Query(None, max_length=200)) -> StreamingResponse:
        """Server-Sent Events: each has ``id`` (its sequence number, kept in the journal), ``event``
        (the kind: created, state, goal, ready, progress, speed, waiting, pause, outcome) and ``data`` (JSON).
        Reconnect with ``Last-Event-ID`` (or ``after``) to receive every event missed, in order, once."""
        start = after
        if last_event_id is not None:  # a reconnecting EventSource's, which wins over the URL's
            if not re.fullmatch(r"[0-9]{1,18}", last_event_id):
                raise UsageError(f"Last-Event-ID must be an event's sequence number, not {last_event_id!r}")
            start = int(last_event_id)
        job_id = daemon.manager._operation(job).id if job is not None else None
        return StreamingResponse(_stream(daemon, request, start, job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return app


async def _stream(daemon: Daemon, request: Request, after: int | None, job: str | None) -> AsyncIterator[str]:
    """``after`` None: from the first event the journal holds (no `gap`: nothing was asked for that
    is gone)."""
    yield "retry: 1000\n\n"
    quiet = 0.0
    kept, last = daemon.journal.event_bounds()
    oldest = kept if kept is not None else last + 1  # (none kept: the next to come; numbers go on)
    seq = after if after is not None else oldest - 1
    if seq < oldest - 1:
        # Events older than the retention were pruned: say so, rather than skip them silently.
        data = json.dumps({"after": seq, "oldest": oldest, "detail": "events before 'oldest' were pruned; "
                           "read every job's state with GET /v1/jobs"})
        yield f"event: gap\ndata: {data}\n\n"
    while not daemon.streams_closed:
        generation = daemon.generation
        batch = daemon.journal.events_after(seq)
        for event in batch:
            seq = event.seq
            if job is not None and event.job != job:
                continue
            data = json.dumps({**event.data, "seq": event.seq, "at": event.at}, sort_keys=True)
            yield f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n"
        if batch:
            quiet = 0.0
            continue
        if await request.is_disconnected():
            return
        # Woken at once by the daemon's own writes; a command run without the daemon (--no-daemon,
        # on another domain) writes to the journal too: looked for every second.
        if await daemon.changes_since(generation, 1.0) == generation:
            quiet += 1.0
            if quiet >= KEEPALIVE:
                quiet = 0.0
                yield ": keepalive\n\n"


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Guard:
    """ASGI middleware: the bearer token (TCP listener) and the body size limit, before any routing."""

    def __init__(self, app: Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]], *,
                 token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.token is not None:
            import hmac

            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.token.encode()):
                await problem(401, "Unauthorized", "this listener needs `Authorization: Bearer TOKEN`")(
                    scope, receive, send)
                return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            await _too_large(scope, receive, send)
            return
        received = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(scope, receive, send)


_TOO_LARGE = f"request bodies are limited to {MAX_BODY} bytes"


class _BodyTooLarge(HTTPException):
    """Raised from the body reader: FastAPI passes an HTTPException on as it is."""

    def __init__(self) -> None:
        super().__init__(413, _TOO_LARGE)


async def _too_large(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    await problem(413, "Request too large", _TOO_LARGE)(scope, receive, send)


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document, as the daemon serves it at /openapi.json."""
    import tempfile

    with tempfile.TemporaryDirectory() as state:
        daemon = Daemon(state)
        try:
            return create_app(daemon).openapi()
        finally:
            daemon.manager.close()


if __name__ == "__main__":  # python -m blockcopy.service.api > docs/openapi.json
    print(json.dumps(openapi_document(), indent=2, sort_keys=True))
