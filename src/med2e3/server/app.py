"""The FastAPI app: one page and a REST API over a `Med2E3Predictor`.

Model calls (encoding an upload, answering, reporting) go through one `ModelQueue`; everything
else (reading an upload, slices, health) runs beside it. Questions that wait in the queue together are
answered in one batched generation (up to ``max_batch``, about any uploads). Encoded volumes are cached in
the `VolumeStore`, so several questions about one upload encode it once. No model logic lives here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from med2e3.data.datasets import REPORT_INSTRUCTIONS
from med2e3.data.io import WINDOWS, Volume, ct_window_problem
from med2e3.errors import InputError, Med2E3Error, VolumeError, VolumeSizeError
from med2e3.inference import MAX_QUESTION_CHARS, Answer, LoadedVolume, Med2E3Predictor, Question
from med2e3.server.guard import Guard
from med2e3.server.queue import ModelQueue, QueueFull, QueueTimeout
from med2e3.server.render import slice_png, window_bounds
from med2e3.server.settings import ServerSettings
from med2e3.server.store import StoredVolume, UnknownVolume, VolumeStore
from med2e3.server.uploads import UploadError, prepare_upload, receive_upload

log = logging.getLogger("med2e3.server")

VOLUME_ID = r"^[0-9a-f]{32}$"

#: Example questions per M3D-VQA question type, shown on the page.
EXAMPLES: dict[str, list[str]] = {
    "Plane": ["In which plane is this CT image acquired?", "Which imaging plane is shown in this scan?"],
    "Phase": ["What is the contrast phase of this CT scan?", "In which phase was this CT acquired?"],
    "Organ": ["Which organ can be seen in this image?", "Which organ shows the cyst?"],
    "Abnormality": [
        "What abnormality is seen in the liver?",
        "What type of lesion is present in the kidney?",
    ],
    "Location": ["Where is the lesion located?", "Where is the solid mass seen?"],
}


# ---- API schema -----------------------------------------------------------------------------------


class ErrorOut(BaseModel):
    error: str = Field(description="what went wrong, in one line")


class VolumeOut(BaseModel):
    id: str = Field(description="server-generated upload id")
    name: str = Field(description="the uploaded file's name (display only)")
    shape: list[int] = Field(description="(D, H, W) of the volume as read; D runs foot to head")
    spacing: list[float] = Field(description="voxel size in mm along (D, H, W)")
    n_slices: int = Field(description="D: slices that /slices/{k}.png serves, k = 0 .. D-1")
    intensity: str = Field(description="'hu' (CT numbers) or 'unit' ([0, 1] values, e.g. .npy)")
    warning: str | None = Field(
        None, description="why answers about this volume may be unreliable (e.g. an MRI under a CT window)"
    )


class AskIn(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    max_new_tokens: int | None = Field(None, ge=1, description="answer length limit (default: the server's)")


class ReportIn(BaseModel):
    max_new_tokens: int | None = Field(None, ge=1, description="report length limit (default: the server's)")


class AnswerOut(BaseModel):
    question: str
    answer: str
    slice_scores: list[float] | None = Field(description="TG-IS weight per model slice (sum 1)")
    slice_ranges: list[list[int]] = Field(description="[start, stop) original slices behind each model slice")
    top_slices: list[int] = Field(description="model slices with the highest weights, best first")
    notes: list[str] = Field(
        description="how the question was read, e.g. truncated for TG-IS's question encoder"
    )


class HealthOut(BaseModel):
    status: str
    model: str
    pending: int = Field(description="model requests running or waiting")
    capacity: int = Field(description="model requests allowed to run or wait at once")
    volumes: int = Field(description="uploads on disk")
    loaded: int = Field(description="encoded volumes in memory")


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "a .nii / .nii.gz file, a zipped DICOM series or a .npy array",
                        }
                    },
                }
            }
        },
    }
}

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 413, 415, 422, 503, 504)
}


# ---- the app --------------------------------------------------------------------------------------


@dataclass
class AnswerJob:
    """A question (or the report instruction) about an upload, waiting to join a batch."""

    entry: StoredVolume
    question: str
    max_new_tokens: int
    on_text: Callable[[str], None] | None = None  # streamed requests: each piece of the answer


class ServerState:
    """The state behind the routes: predictor, queue, store, settings."""

    def __init__(self, predictor: Med2E3Predictor, settings: ServerSettings, model_name: str):
        self.predictor = predictor
        self.settings = settings
        self.model_name = model_name
        self.queue = ModelQueue(settings.max_waiting, settings.request_timeout_s, settings.max_batch)
        self.store = VolumeStore(
            settings.ttl_s,
            settings.max_stored,
            settings.max_disk_bytes,
            settings.max_loaded,
            parent=settings.upload_dir,
        )
        self.uploads_running = 0
        self._reading = threading.Lock()

    # -- reading (worker threads, beside the model) --
    def read_volume(self, entry: StoredVolume) -> Volume:
        """The upload's volume, read again from disk (once) if it left memory with its encoding."""
        with self._reading:
            volume = self.store.volume(entry.id)
            if volume is None:
                volume = self.predictor.read(entry.source)
                self.store.keep_volume(entry.id, volume)
            return volume

    # -- model-thread jobs (run one at a time by the queue) --
    def ensure_loaded(self, entry: StoredVolume) -> LoadedVolume:
        """The encoded upload (encoded again if it left the cache)."""
        self.store.get(entry.id)  # UnknownVolume if it expired while waiting
        loaded = self.store.loaded(entry.id)
        if loaded is None:
            volume = self.store.volume(entry.id)
            loaded = self.predictor.load(entry.source if volume is None else volume)
            self.store.cache(entry.id, loaded)
        return loaded

    def answer_batch(self, jobs: list[AnswerJob]) -> list[Answer | Exception]:
        """Answer ``jobs`` in one batched generation.

        A job whose upload is gone or unreadable, or whose question cannot be asked, gets its own error
        and stays out of the batch; a failure of the generation itself (e.g. out of memory) is every
        batched job's.
        """
        prepared = [self._question(job) for job in jobs]
        ready = [q for q in prepared if isinstance(q, Question)]
        try:
            answers = iter(self.predictor.ask_batch(ready) if ready else [])
        except Exception as err:
            answers = iter([err] * len(ready))
        return [p if isinstance(p, Exception) else next(answers) for p in prepared]

    def _question(self, job: AnswerJob) -> Question | Exception:
        try:
            self.predictor.check_question(job.question)
            loaded = self.ensure_loaded(job.entry)
        except Exception as err:  # this job's error alone
            return err
        return Question(loaded, job.question, max_new_tokens=job.max_new_tokens, on_text=job.on_text)

    # -- helpers for routes --
    def entry(self, vid: str) -> StoredVolume:
        return self.store.get(vid)

    def tokens(self, requested: int | None, limit: int) -> int:
        if requested is not None and requested > limit:
            raise InputError(f"max_new_tokens: {requested} is more than this server's limit of {limit}")
        return requested or limit

    def submit(self, job: AnswerJob) -> Future[Answer]:
        """Queue a question to be answered with the others waiting (QueueFull now if the queue is full)."""
        return self.queue.submit_batched(self.answer_batch, job)

    async def answer(self, entry: StoredVolume, question: str, max_new_tokens: int) -> Answer:
        try:
            return await self.queue.wait(self.submit(AnswerJob(entry, question, max_new_tokens)))
        except VolumeError as err:
            raise refused(entry.label, err) from None

    def open_stream(self, entry: StoredVolume, question: str, max_new_tokens: int) -> StreamingResponse:
        """Queue a streamed answer (503 now if the queue is full) and return its server-sent events:
        ('piece', text) as the answer grows, then ('answer', dict) or ('error', dict)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        gone = threading.Event()

        def emit(kind: str, data: Any) -> None:
            if not gone.is_set():
                with contextlib.suppress(RuntimeError):  # the loop closed (shutdown)
                    loop.call_soon_threadsafe(events.put_nowait, (kind, data))

        job = AnswerJob(entry, question, max_new_tokens, on_text=lambda text: emit("piece", {"text": text}))
        future = self.submit(job)
        future.add_done_callback(lambda done: done.cancelled() or emit(*final_event(done, entry.label)))
        timeout = self.settings.request_timeout_s

        async def body() -> AsyncIterator[str]:
            deadline = loop.time() + timeout
            try:
                while True:
                    try:
                        kind, data = await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        kind, data = "error", {"error": f"the model did not answer within {timeout:g} s"}
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if kind != "piece":
                        return
            finally:
                gone.set()
                future.cancel()

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )


OOM_MESSAGE = "the model ran out of memory on this request; try again later or with a smaller volume"


def final_event(done: Future[Answer], label: str) -> tuple[str, dict[str, Any]]:
    """The last server-sent event of a streamed answer: ('answer', the answer) or ('error', why)."""
    err = done.exception()
    if err is None:
        return "answer", done.result().to_dict()
    if isinstance(err, UnknownVolume):
        return "error", {"error": unknown_message(err)}
    if isinstance(err, Med2E3Error):
        return "error", {"error": public_message(err, label)}
    if isinstance(err, torch.OutOfMemoryError):
        return "error", {"error": OOM_MESSAGE}
    log.error("streamed answer failed", exc_info=err)
    return "error", {"error": "internal error while answering (see the server log)"}


def unknown_message(err: UnknownVolume) -> str:
    return f"no volume {err.args[0]!r}: it was never uploaded, was deleted, or expired"


def refused(label: str, err: VolumeError) -> UploadError:
    """A reader's error as the upload's: named by its label, 413 when the volume is over a size limit."""
    return UploadError(label, err.reason, 413 if isinstance(err, VolumeSizeError) else 400)


def public_message(err: Exception, label: str) -> str:
    """An error's message without server paths: volume errors name the upload, not the file on disk."""
    if isinstance(err, VolumeError) and not isinstance(err, UploadError):
        return f"{label}: {err.reason}"
    return str(err)


def create_app(
    predictor: Med2E3Predictor, settings: ServerSettings | None = None, model_name: str = "med2e3"
) -> FastAPI:
    """The web app over ``predictor``; its private upload folder is removed when the app shuts down."""
    settings = settings or ServerSettings()
    server = ServerState(predictor, settings, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.store.open()
        sweeper = asyncio.create_task(_sweep_forever(server.store, settings.sweep_interval_s))
        try:
            yield
        finally:
            sweeper.cancel()
            server.queue.shutdown()
            server.store.close()

    app = FastAPI(
        title="Med-2E3",
        description="Ask a CT volume questions; every answer reports the slices TG-IS weighted.",
        version="1",
        docs_url=None,  # the Swagger / ReDoc pages load scripts from a CDN; the schema is enough
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.server = server
    app.add_middleware(Guard, token=settings.token)
    _add_error_handlers(app)
    _add_page(app)
    _add_routes(app, server)
    return app


async def _sweep_forever(store: VolumeStore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        for vid in await run_in_threadpool(store.sweep):
            log.info("deleted expired upload %s", vid)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def upload_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, UploadError)
        return _error(err.status, str(err))

    async def unknown_volume(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, UnknownVolume)
        return _error(404, unknown_message(err))

    async def out_of_memory(_: Request, err: Exception) -> JSONResponse:
        return _error(503, OOM_MESSAGE, {"Retry-After": "30"})

    async def internal(_: Request, err: Exception) -> JSONResponse:
        return _error(500, "internal server error (see the server log)")

    async def queue_full(_: Request, err: Exception) -> JSONResponse:
        return _error(503, str(err), {"Retry-After": "5"})

    async def queue_timeout(_: Request, err: Exception) -> JSONResponse:
        return _error(504, str(err))

    async def bad_input(_: Request, err: Exception) -> JSONResponse:
        return _error(400, str(err))

    async def invalid(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return _error(422, f"{where}: {first['msg']}" if where else first["msg"])

    async def http_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    for exc, handler in (
        (UploadError, upload_error),
        (UnknownVolume, unknown_volume),
        (QueueFull, queue_full),
        (QueueTimeout, queue_timeout),
        (InputError, bad_input),
        (RequestValidationError, invalid),
        (HTTPException, http_error),
        (torch.OutOfMemoryError, out_of_memory),
        (Exception, internal),
    ):
        app.add_exception_handler(exc, handler)


def _add_page(app: FastAPI) -> None:
    page, csp = _page()
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)


def _page() -> tuple[str, str]:
    """The page with its CSS and JS inlined (one request, no token needed for assets) and a CSP allowing only them."""
    static = resources.files("med2e3.server") / "static"
    css = (static / "style.css").read_text(encoding="utf-8")
    js = (static / "app.js").read_text(encoding="utf-8")
    html = (static / "index.html").read_text(encoding="utf-8")
    html = html.replace("<!-- style -->", f"<style>{css}</style>").replace(
        "<!-- script -->", f"<script>{js}</script>"
    )

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    csp = (
        f"default-src 'none'; script-src {digest(js)}; style-src {digest(css)}; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


def _add_routes(app: FastAPI, server: ServerState) -> None:
    settings = server.settings

    @app.get("/api/health", response_model=HealthOut, tags=["server"])
    async def health() -> dict:
        """Liveness and load; never touches the model."""
        return {
            "status": "ok",
            "model": server.model_name,
            "pending": server.queue.pending,
            "capacity": server.queue.capacity,
            "volumes": len(server.store),
            "loaded": server.store.n_loaded,
        }

    @app.get("/api/info", tags=["server"])
    async def info() -> dict:
        """What the page needs: model, windows, example questions, limits."""
        return {
            "model": server.model_name,
            "num_slices": server.predictor.model.config.num_slices,
            "windows": list(WINDOWS),
            "default_window": server.predictor.window,
            "examples": EXAMPLES,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_new_tokens": settings.max_new_tokens,
            "report_max_new_tokens": settings.report_max_new_tokens,
        }

    @app.post(
        "/api/volumes",
        status_code=201,
        response_model=VolumeOut,
        responses=ERRORS,
        tags=["volumes"],
        openapi_extra=UPLOAD_BODY,
    )
    async def upload(request: Request) -> dict:
        """Upload one volume as multipart field ``file``: a NIfTI (.nii / .nii.gz), a zipped DICOM series or a .npy.

        The content decides the type, not the name. The volume is read and encoded once here.
        """
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + 65536:
            raise UploadError(
                None, f"the upload is larger than the {settings.max_upload_bytes / 2**20:.1f} MB limit", 413
            )
        if server.uploads_running >= settings.max_uploads:
            raise QueueFull(f"{server.uploads_running} uploads are already in progress; try again shortly")
        server.queue.check_room()
        server.uploads_running += 1
        vid, folder = server.store.reserve()
        try:
            raw = folder / "upload.bin"
            label = await receive_upload(
                request.stream(), request.headers.get("content-type"), raw, settings.max_upload_bytes
            )
            source = await run_in_threadpool(prepare_upload, raw, folder, label, settings)
            try:  # read beside the model (slices and other requests go on); only encoding queues
                volume = await run_in_threadpool(server.predictor.read, source)
                loaded = await server.queue.run(server.predictor.load, volume)
            except VolumeError as err:
                raise refused(label, err) from None
            warning = await run_in_threadpool(ct_window_problem, volume, server.predictor.window, label)
            # its value range and disk size read the whole volume: off the event loop
            entry = await run_in_threadpool(server.store.add, vid, source, label, loaded, warning)
        except BaseException:
            server.store.discard(vid)
            raise
        finally:
            server.uploads_running -= 1
        log.info("upload %s: %s %s", vid, label, entry.shape)
        return entry.info()

    @app.get("/api/volumes/{vid}", response_model=VolumeOut, responses=ERRORS, tags=["volumes"])
    async def volume_info(vid: str = _vid()) -> dict:
        """What an upload is."""
        return server.entry(vid).info()

    @app.delete("/api/volumes/{vid}", status_code=204, responses=ERRORS, tags=["volumes"])
    async def delete_volume(vid: str = _vid()) -> Response:
        """Delete an upload now (it is deleted anyway after the time-to-live)."""
        server.entry(vid)
        await run_in_threadpool(server.store.discard, vid)
        return Response(status_code=204)

    @app.get(
        "/api/volumes/{vid}/slices/{k}.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **ERRORS},
        tags=["volumes"],
    )
    async def slice_image(
        k: int,
        vid: str = _vid(),
        window: str = Query("abdomen", description=f"CT window: {', '.join(WINDOWS)}"),
    ) -> Response:
        """Depth slice ``k`` (0 = foot) of the original volume as a PNG with a CT window."""
        entry = server.entry(vid)
        if not 0 <= k < entry.shape[0]:
            raise InputError(f"slice {k} is out of range: the volume has slices 0 .. {entry.shape[0] - 1}")
        try:
            bounds = window_bounds(entry, window)
        except ValueError as err:
            raise InputError(str(err)) from None
        volume = server.store.volume(vid)
        if volume is None:  # its encoding left the cache: read it again, without waiting for the model
            try:
                volume = await run_in_threadpool(server.read_volume, entry)
            except VolumeError as err:
                raise refused(entry.label, err) from None
        png = await run_in_threadpool(slice_png, volume.array, k, bounds)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/volumes/{vid}/ask", response_model=AnswerOut, responses=ERRORS, tags=["questions"])
    async def ask(body: AskIn, vid: str = _vid()) -> dict:
        """Answer a question about an upload, with its TG-IS slice scores."""
        entry = server.entry(vid)
        n = server.tokens(body.max_new_tokens, settings.max_new_tokens)
        server.predictor.check_question(body.question)
        answer = await server.answer(entry, body.question, n)
        return answer.to_dict()

    @app.post("/api/volumes/{vid}/report", response_model=AnswerOut, responses=ERRORS, tags=["questions"])
    async def report(body: ReportIn | None = None, vid: str = _vid()) -> dict:
        """Write a findings report for an upload."""
        entry = server.entry(vid)
        n = server.tokens(body and body.max_new_tokens, settings.report_max_new_tokens)
        answer = await server.answer(entry, REPORT_INSTRUCTIONS[0], n)
        return answer.to_dict()

    stream_doc = {
        200: {
            "description": "server-sent events: 'piece' {text} as the answer grows, then 'answer' "
            "(as /ask returns) or 'error' {error}",
            "content": {"text/event-stream": {}},
        },
        **ERRORS,
    }

    @app.post(
        "/api/volumes/{vid}/ask/stream",
        response_class=StreamingResponse,
        responses=stream_doc,
        tags=["questions"],
    )
    async def ask_stream(body: AskIn, vid: str = _vid()) -> StreamingResponse:
        """Answer a question, streaming the text as it is generated."""
        entry = server.entry(vid)
        n = server.tokens(body.max_new_tokens, settings.max_new_tokens)
        server.predictor.check_question(body.question)  # a 400 now, not an error event after a 200
        return server.open_stream(entry, body.question, n)

    @app.post(
        "/api/volumes/{vid}/report/stream",
        response_class=StreamingResponse,
        responses=stream_doc,
        tags=["questions"],
    )
    async def report_stream(body: ReportIn | None = None, vid: str = _vid()) -> StreamingResponse:
        """Write a findings report, streaming the text as it is generated."""
        entry = server.entry(vid)
        n = server.tokens(body and body.max_new_tokens, settings.report_max_new_tokens)
        return server.open_stream(entry, REPORT_INSTRUCTIONS[0], n)


def _vid() -> Any:
    return PathParam(pattern=VOLUME_ID, description="an id returned by POST /api/volumes")


def model_name_of(path: str | Path) -> str:
    """A display name for a model folder (``bundled:NAME`` stays as written: a relative path's name)."""
    return Path(path).resolve().name
