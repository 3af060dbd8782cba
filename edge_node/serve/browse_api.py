"""HTTP routes of the radiologist's page: studies and series, slice images, series labels.

    GET  /                              page: studies -> series -> slices (static/index.html)
    GET  /api/studies?limit&offset&verdict&status&q&date_from&date_to
                                        one page of studies, newest first, + the model's state
    GET  /api/series/{uid}?limit&offset the series, its study and its slices (arrival order)
    GET  /api/images/{id}.png?size=512  the preprocessed lung-windowed slice, larger
    POST /api/series/{uid}/label        {label, who}: the label of every slice of the series
    GET  /api/model                     the model's state (untrained, calibrated, threshold)
    GET  /api/changes                   a token that moves with the data (the page polls it)

Mounted by ``edge_node.serve.api.NodeApi`` behind its token check. Bad input gives 400 with a
message, never 500; the queries are in ``edge_node.serve.browse``, labels go through
``edge_node.labels.LabelBook``.
"""

from __future__ import annotations

import html
import io
import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from edge_node.errors import InputError, LabelError, QueryError, StoreError
from edge_node.ingest.preprocess import model_key
from edge_node.serve import browse

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from edge_node.serve.inference import OnnxModel
    from edge_node.serve.node_view import NodeView

STATIC = Path(__file__).with_name("static")
IMAGE_MIN_PX, IMAGE_MAX_PX, IMAGE_DEFAULT_PX = 64, 1024, 512
MAX_LABEL_BODY = 4096  # bytes of a series label request
MAX_WHO = 64  # characters of a label author
MAX_ROW_ID = 2**63 - 1  # SQLite INTEGER; a larger id in a URL is simply not found


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def model_status(model: OnnxModel | None) -> dict[str, Any]:
    """What the page says about the served model, with plain-language warnings."""
    if model is None:
        return {
            "loaded": False,
            "warnings": ["No model loaded: the node is waiting for one; nothing is predicted."],
        }
    info = model.info
    warnings = []
    if info.untrained:
        warnings.append(
            "Model untrained (random initialisation): its scores are noise, not evidence. "
            "Do not read the verdicts."
        )
    if not info.calibrated:
        warnings.append(
            f"Model not calibrated: threshold {info.threshold:.2f} and uncertain band "
            f"\u00b1{info.uncertain_band:.2f} are defaults, not fitted on validation data."
        )
    return {
        "loaded": True,
        "version": info.model_version,
        "arch": info.arch,
        "init": info.init,
        "untrained": info.untrained,
        "calibrated": info.calibrated,
        "threshold": info.threshold,
        "uncertain_band": info.uncertain_band,
        "temperature": info.temperature,
        "warnings": warnings,
    }


def banner_html(status: dict[str, Any]) -> str:
    """The warnings as the page's first render shows them (JS keeps them current)."""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in status["warnings"])
    hidden = "" if items else " hidden"
    return f'<div id="banner" class="banner" role="alert"{hidden}><ul>{items}</ul></div>'


class BrowseRoutes:
    """The page's handlers over a running node (a ``NodeView``)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self._page = string.Template((STATIC / "index.html").read_text())

    def routes(self, auth: Callable[[Any], Any]) -> list[BaseRoute]:
        """The routes, each wrapped by ``auth`` (the API's token check)."""
        return [
            Route("/", auth(self.page)),
            Route("/api/studies", auth(self.studies)),
            Route("/api/model", auth(self.model)),
            Route("/api/changes", auth(self.changes)),
            Route("/api/series/{uid:str}", auth(self.series)),
            Route("/api/series/{uid:str}/label", auth(self.series_label), methods=["POST"]),
            Route("/api/images/{pred_id:int}.png", auth(self.image)),
        ]

    async def page(self, request: Request) -> Response:
        status = model_status(self.node.holder.current())
        page = self._page.substitute(
            node_id=html.escape(self.node.config.node_id),
            model=html.escape(str(status.get("version", "none (waiting)"))),
            banner=banner_html(status),
        )
        return HTMLResponse(page)

    async def model(self, request: Request) -> Response:
        return JSONResponse(model_status(self.node.holder.current()))

    async def changes(self, request: Request) -> Response:
        """A token that changes with the data or the model: the page polls it every few
        seconds and fetches the study list only when it moved."""
        try:
            token = await run_in_threadpool(browse.fingerprint, self.node.store)
        except StoreError as exc:
            return _error(503, str(exc))
        model = self.node.holder.current()
        return JSONResponse({"changes": f"{token}:{model.info.sha256[:12] if model else '-'}"})

    async def studies(self, request: Request) -> Response:
        try:
            query = browse.StudyQuery.from_params(request.query_params)
        except QueryError as exc:
            return _error(400, str(exc))
        try:
            page = await run_in_threadpool(browse.list_studies, self.node.store, query)
        except StoreError as exc:
            return _error(503, str(exc))
        page["model"] = model_status(self.node.holder.current())
        return JSONResponse(page)

    async def series(self, request: Request) -> Response:
        try:
            uid = browse.check_uid(request.path_params["uid"], "series UID")
            query = browse.SliceQuery.from_params(request.query_params)
            detail = await run_in_threadpool(browse.series_detail, self.node.store, uid, query)
        except QueryError as exc:
            return _error(404 if "no such" in str(exc) else 400, str(exc))
        except StoreError as exc:
            return _error(503, str(exc))
        return JSONResponse(detail)

    async def series_label(self, request: Request) -> Response:
        try:
            uid = browse.check_uid(request.path_params["uid"], "series UID")
        except QueryError as exc:
            return _error(400, str(exc))
        body = await request.body()
        if len(body) > MAX_LABEL_BODY:
            return _error(413, f"label request larger than {MAX_LABEL_BODY} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body must be JSON {label, who}")
        if not isinstance(data, dict) or not isinstance(data.get("label"), str):
            return _error(400, "label (string) is required")
        who = data.get("who") or "api"
        if not isinstance(who, str) or len(who) > MAX_WHO or not who.isprintable():
            return _error(400, f"who must be at most {MAX_WHO} printable characters")
        from edge_node.labels import LabelBook, normalize_label

        try:
            label = normalize_label(data["label"])
        except LabelError as exc:
            return _error(400, str(exc))

        def record() -> tuple[int, int]:
            with browse.browsing(self.node.store) as b:
                sops = b.series_sop_uids(uid)
            changed = 0
            with LabelBook(self.node.config.paths.database) as book:
                for sop in sops:
                    changed += int(book.set(sop, label, who=who, source="api"))
            return changed, len(sops)

        try:
            changed, total = await run_in_threadpool(record)
        except (LabelError, QueryError) as exc:
            return _error(400, str(exc))
        except StoreError as exc:
            return _error(503, str(exc))
        if total == 0:
            return _error(404, "no predicted slices in that series")
        return JSONResponse({"ok": True, "label": label, "slices": total, "changed": changed})

    async def image(self, request: Request) -> Response:
        raw = request.query_params.get("size", str(IMAGE_DEFAULT_PX))
        if not raw.isdigit() or not IMAGE_MIN_PX <= int(raw) <= IMAGE_MAX_PX:
            return _error(400, f"size must be an integer from {IMAGE_MIN_PX} to {IMAGE_MAX_PX}")
        pred_id = int(request.path_params["pred_id"])
        if pred_id > MAX_ROW_ID:
            return _error(404, "no such prediction")
        png = await run_in_threadpool(self._render_png, pred_id, int(raw))
        if png is None:
            return _error(404, "no such prediction or its file is gone")
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"}
        )

    def _render_png(self, pred_id: int, size: int) -> bytes | None:
        """The slice as the model saw it (its lung window), rendered at ``size`` pixels; not
        cached on disk (the thumbnails are)."""
        row = self.node.store.prediction(pred_id)
        model = self.node.holder.current()
        if row is None or model is None:
            return None
        from PIL import Image

        from edge_node.ingest.preprocess import DecodeLimits, PreprocessParams, prepare

        key = model_key(model, self.node.config.preprocess)
        limits = DecodeLimits.from_config(self.node.config.preprocess)
        params = PreprocessParams(key[0], key[1], size, ("*",), limits=limits)
        try:
            frames = prepare(Path(row["path"]), params).frames
        except (InputError, OSError):
            return None
        frame = frames[min(int(row["frame"]), len(frames) - 1)]
        img = Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8), "L")
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()
