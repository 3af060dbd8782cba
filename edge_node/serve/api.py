"""Local HTTP API and web page of the node (Starlette, served by uvicorn in a thread).

    GET  /health                      liveness + model + queue depth (no token needed)
    GET  /api/predictions?limit=N     recent predictions, newest first
    GET  /api/predictions/{id}        one prediction
    GET  /api/thumbnails/{id}.png     the preprocessed slice, small (cached in state_dir)
    POST /api/predict                 body = one DICOM file; predicts, stores, returns rows
    POST /api/labels                  {sop_instance_uid, label, who} -> edge_node.labels
    GET  /metrics                     Prometheus text
    GET  /slices                      page: recent slices, thumbnails, label buttons
    GET  /, /api/studies, /api/series/{uid}, /api/images/{id}.png, /api/model,
    POST /api/series/{uid}/label      the studies page and its routes (edge_node.serve.browse_api)

Bound to 127.0.0.1 by default; when ``api.token`` is set every route but /health needs
``Authorization: Bearer <token>`` (or ``?token=`` on GET, so the page and its images work in
a browser). Every request first passes ``edge_node.serve.api_guard.RequestGuard``: Host must name
the node (DNS rebinding), writes must come from its own page (Origin) with a JSON body, the
upload with ``Content-Type: application/dicom``, and bodies are bounded (413).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import io
import logging
import os
import socket
import string
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edge_node.errors import InputError, LabelError, NodeError
from edge_node.federate.model_refusal import refusal_json, render_refusals
from edge_node.ingest.preprocess import model_key
from edge_node.serve.api_guard import (
    BadJson,
    BodyTooLarge,
    RequestGuard,
    allowed_host_names,
    parse_json,
)
from edge_node.serve.browse_api import BrowseRoutes
from edge_node.serve.pipeline import DUPLICATE
from edge_node.serve.stats import render_metrics

if TYPE_CHECKING:
    from edge_node.serve.node_view import NodeView

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
UPLOAD_TYPES = {"/api/predict": "application/dicom"}  # bodies that are not JSON (api_guard)
MAX_ROW_ID = 2**63 - 1  # SQLite INTEGER; a larger id in a URL is simply not found
MAX_LIMIT = 1000  # ?limit= bound of list routes
THUMB_PX = 128
Handler = Callable[[Request], Awaitable[Response]]


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return _json({"error": message, **extra}, status)


def _with_thumb(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "thumbnail": f"/api/thumbnails/{row['id']}.png"}


class NodeApi:
    """Route handlers over a running node's parts (a ``NodeView``)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.token = node.config.api.token
        self.thumbs = node.config.paths.state.thumbnails
        self.uploads = node.config.paths.state.uploads
        self.max_upload = int(node.config.api.max_upload_mb) << 20
        self._page = string.Template((STATIC / "slices.html").read_text())

    def app(self) -> Starlette:
        a = self._auth
        routes = [
            Route("/health", self.health),
            Route("/api/predictions", a(self.predictions)),
            Route("/api/predictions/{pred_id:int}", a(self.prediction)),
            Route("/api/thumbnails/{pred_id:int}.png", a(self.thumbnail)),
            Route("/api/predict", a(self.predict), methods=["POST"]),
            Route("/api/labels", a(self.label), methods=["POST"]),
            Route("/metrics", a(self.metrics)),
            Route("/slices", a(self.page)),
            Route("/static/{name:str}", a(self.static)),
            *BrowseRoutes(self.node).routes(a),  # "/" (studies page) and its /api routes
        ]
        cfg = self.node.config.api
        guard = Middleware(
            RequestGuard,
            hosts=allowed_host_names(cfg.host, cfg.allowed_hosts),
            upload_types=UPLOAD_TYPES,
            max_upload_bytes=self.max_upload,
        )
        return Starlette(routes=routes, middleware=[guard])

    def _auth(self, handler: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            if self.token is not None:
                given = ""
                header = request.headers.get("authorization", "")
                if header.lower().startswith("bearer "):
                    given = header[7:].strip()
                elif request.method == "GET":
                    given = request.query_params.get("token", "")
                if not hmac.compare_digest(given.encode(), self.token.encode()):
                    return _error(401, "missing or wrong bearer token")
            return await handler(request)

        return checked

    # -- read-only ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        model = self.node.holder.current()
        return _json(
            {
                "status": (
                    "inbox_missing"
                    if self.node.watcher.inbox_missing
                    else "ok"
                    if model is not None
                    else "waiting_for_model"
                ),
                "node_id": self.node.config.node_id,
                "model_version": model.info.model_version if model else None,
                "arch": model.info.arch if model else None,
                "uptime_s": round(time.time() - self.node.started_at, 3),
                "queue": self.node.pipeline.queue_depth(),
                "incomplete_files": self.node.watcher.pending_count(),
                "inbox_events": self.node.watcher.events_active,
                "model_refused": refusal_json(self.node.monitor.refusals),
            }
        )

    async def predictions(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"limit must be 1..{MAX_LIMIT}")
        rows = await run_in_threadpool(self.node.store.recent_predictions, limit)
        return _json({"predictions": [_with_thumb(r) for r in rows]})

    async def prediction(self, request: Request) -> Response:
        if int(request.path_params["pred_id"]) > MAX_ROW_ID:
            return _error(404, "no such prediction")
        row = await run_in_threadpool(self.node.store.prediction, request.path_params["pred_id"])
        if row is None:
            return _error(404, "no such prediction")
        return _json(_with_thumb(row))

    async def metrics(self, request: Request) -> Response:
        def build() -> str:
            model = self.node.holder.current()
            return render_metrics(
                stats=self.node.stats,
                files_by_outcome=self.node.store.counts_by_outcome(),
                predictions_by_label=self.node.store.counts_by_label(),
                model_version=model.info.model_version if model else None,
                model_arch=model.info.arch if model else None,
                queue_depth=self.node.pipeline.queue_depth(),
                pending_files=self.node.watcher.pending_count(),
                model_swaps=self.node.holder.swaps,
                dicom=self.node.dicom_stats if self.node.dicom is not None else None,
                dicom_outbox_pending=self.node.dicom.outbox_pending() if self.node.dicom else None,
            ) + render_refusals(self.node.monitor.refusals)

        text = await run_in_threadpool(build)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def thumbnail(self, request: Request) -> Response:
        pred_id = int(request.path_params["pred_id"])
        if pred_id > MAX_ROW_ID:
            return _error(404, "no such prediction or its file is gone")
        png = await run_in_threadpool(self._thumbnail_png, pred_id)
        if png is None:
            return _error(404, "no such prediction or its file is gone")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    def _thumbnail_png(self, pred_id: int) -> bytes | None:
        cached = self.thumbs / f"{pred_id}.png"
        if cached.is_file():
            return cached.read_bytes()
        row = self.node.store.prediction(pred_id)
        model = self.node.holder.current()
        if row is None or model is None:
            return None
        from PIL import Image

        from edge_node.ingest.preprocess import DecodeLimits, PreprocessParams, prepare

        key = model_key(model, self.node.config.preprocess)
        limits = DecodeLimits.from_config(self.node.config.preprocess)
        params = PreprocessParams(key[0], key[1], key[2], ("*",), limits=limits)
        try:
            frames = prepare(Path(row["path"]), params).frames
        except (InputError, OSError):
            return None
        frame = frames[min(int(row["frame"]), len(frames) - 1)]
        img = Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8), "L")
        img = img.resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=True)
        self.thumbs.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = cached.with_name(f".{pred_id}.{uuid.uuid4().hex}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(buf.getvalue())  # a slice of a patient: owner-only, whatever the umask
        tmp.replace(cached)
        return buf.getvalue()

    # -- writes ------------------------------------------------------------------------------

    async def predict(self, request: Request) -> Response:
        if self.node.holder.current() is None:
            return _error(503, "no model loaded yet")
        path = await self._receive_upload(request)
        if path is None:
            return _error(400, "send the DICOM file as the request body")
        try:
            outcome = await run_in_threadpool(self.node.pipeline.process_now, path)
        except NodeError as exc:
            path.unlink(missing_ok=True)
            return _error(503, str(exc))
        if outcome.outcome == "skipped" and outcome.reason == DUPLICATE:
            path.unlink(missing_ok=True)
            sop = outcome.sop_instance_uid or ""
            rows = await run_in_threadpool(self.node.store.predictions_for, sop)
            return _json({"outcome": "duplicate", "predictions": [_with_thumb(r) for r in rows]})
        if outcome.outcome != "predicted":
            path.unlink(missing_ok=True)  # keep only uploads that became predictions
            return _error(422, f"file not used: {outcome.reason}", outcome=outcome.outcome)
        return _json(
            {"outcome": "predicted", "predictions": [_with_thumb(r) for r in outcome.predictions]}
        )

    async def _receive_upload(self, request: Request) -> Path | None:
        """Stream the body into ``uploads/`` (0600), never whole in memory; None when empty.
        Past ``max_upload`` the partial file is removed and BodyTooLarge gives the 413."""
        self.uploads.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.uploads / f"{uuid.uuid4().hex}.dcm"
        size = 0
        try:
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_upload:
                        raise BodyTooLarge(self.max_upload)
                    f.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if size == 0:
            path.unlink(missing_ok=True)
            return None
        return path

    async def label(self, request: Request) -> Response:
        try:
            data = parse_json(await request.body())
        except BadJson:
            return _error(400, "body must be JSON {sop_instance_uid, label, who}")
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) and data.get(k) for k in ("sop_instance_uid", "label")
        ):
            return _error(400, "sop_instance_uid and label (strings) are required")
        who = data.get("who") or "api"
        if not isinstance(who, str):
            return _error(400, "who must be a string")
        frame = data.get("frame")  # optional: one frame of a multi-frame file
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int)):
            return _error(400, "frame must be an integer (or absent: the whole file)")
        try:
            from edge_node.labels import LabelBook
        except ImportError:
            return _error(501, "labels are not available in this build (edge_node.labels missing)")

        def record() -> bool:
            book = LabelBook(self.node.config.paths.database)
            try:
                return bool(
                    book.set(
                        data["sop_instance_uid"],
                        data["label"],
                        who=str(who),
                        source="api",
                        frame=frame,
                    )
                )
            finally:
                book.close()

        try:
            changed = await run_in_threadpool(record)
        except LabelError as exc:
            return _error(400, str(exc))
        return _json({"ok": True, "changed": changed, "label": data["label"]})

    # -- page --------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        rows = await run_in_threadpool(self.node.store.recent_predictions, 50)
        token = request.query_params.get("token", "") if self.token else ""
        body_rows = self._rows_html(rows, token)
        if request.query_params.get("fragment") == "rows":
            return HTMLResponse(body_rows)
        model = self.node.holder.current()
        page = self._page.substitute(
            node_id=html.escape(self.node.config.node_id),
            model=html.escape(model.info.model_version if model else "none (waiting)"),
            count=len(rows),
            rows=body_rows,
        )
        return HTMLResponse(page)

    def _rows_html(self, rows: list[dict[str, Any]], token: str) -> str:
        q = f"?token={html.escape(token)}" if token else ""
        out = []
        for r in rows:
            pid = int(r["id"])
            uid = html.escape(str(r["sop_instance_uid"]))
            label = html.escape(str(r["label"]))
            name = html.escape(Path(str(r["path"])).name)
            if r["frame"]:
                name += f" [frame {int(r['frame'])}]"
            human = r.get("human_label")
            human_html = html.escape(str(human)) if human else "&ndash;"
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"] or 0))
            out.append(
                f'<tr data-id="{pid}" data-uid="{uid}">'
                f'<td><img class="thumb" alt="slice {pid}" width="{THUMB_PX}" '
                f'height="{THUMB_PX}" src="/api/thumbnails/{pid}.png{q}"></td>'
                f'<td class="file">{name}</td>'
                f'<td class="pred {label}">{label}</td>'
                f'<td class="conf">{100 * float(r["confidence"]):.1f}%</td>'
                f'<td class="version">{html.escape(str(r["model_version"]))}</td>'
                f'<td class="when">{when}</td>'
                f'<td class="human">{human_html}</td>'
                '<td class="buttons"><button class="label covid" data-label="covid">covid</button>'
                '<button class="label non_covid" data-label="non_covid">non_covid</button></td>'
                "</tr>"
            )
        if not out:
            out.append('<tr class="empty"><td colspan="8">No predictions yet.</td></tr>')
        return "\n".join(out)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        js = "text/javascript"
        types = {"app.js": js, "slices.js": js, "style.css": "text/css"}
        if name not in types:
            return _error(404, "not found")
        return Response((STATIC / name).read_bytes(), media_type=types[name])


class ApiServer:
    """uvicorn in a background thread, on a socket bound before start (port 0 = free port)."""

    def __init__(self, node: NodeView) -> None:
        cfg = node.config.api
        self.host, self.port = cfg.host, cfg.port
        self.app = NodeApi(node).app()
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        )
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        family, kind, proto, _, addr = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        port = int(sock.getsockname()[1])
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[sock])),
            name="api",
            daemon=True,
        )
        self._thread.start()
        return port

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
