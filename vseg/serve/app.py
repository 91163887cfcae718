"""The HTTP front door: FastAPI routes over one `Service` (its `Predictor` replicas) and the fine-tune jobs.

Errors are JSON `{"error": "..."}` with a 4xx status saying what to change; anything unexpected is a 500 with
one line (the traceback goes to the server log only) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from vseg.config import ConfigError, ServeConfig
from vseg.data.io import mask_from_pil
from vseg.inference.engine import ItemPrediction
from vseg.inference.inputs import DEFAULT_PROMPT
from vseg.serve import masks
from vseg.serve.batcher import Outcome, Task
from vseg.serve.jobs import JobManager
from vseg.serve.prepare import ImageSource
from vseg.serve.requests import (
    AnnotationRequest,
    ApiError,
    ChatRequest,
    ModelSwitch,
    Prediction,
    RefineRequest,
    SegmentRequest,
    SegmentResponse,
    b64,
    check_prompt,
    confined,
    decode_bytes,
    load_image,
    segment_prompts,
    segment_request,
    validation_message,
)
from vseg.serve.service import Service

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _body_schema(model: type) -> dict[str, Any]:
    """openapi_extra for routes that parse their body themselves (JSON or multipart on one path)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content: dict[str, Any] = {"application/json": {"schema": ref}}
    if model is SegmentRequest:
        content["multipart/form-data"] = {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "prompt": {"type": "string"},
                    "answer": {"type": "string", "enum": ["teacher_forced", "generate"]},
                    "threshold": {"type": "number"},
                    "formats": {"type": "string", "description": "comma-separated: png,rle,polygons,probability"},
                },
                "required": ["image"],
            }
        }
    return {"requestBody": {"required": True, "content": content}}


def prediction(index: int, out: Outcome, formats: list[str], threshold: float | None) -> dict[str, Any]:
    """One image's JSON result; `threshold` other than the server's recomputes the mask from the probability."""
    start = time.perf_counter()
    p: ItemPrediction = out.prediction
    mask = p.mask if threshold is None or p.probability is None else p.probability > threshold
    h, w = mask.shape
    result: dict[str, Any] = {
        "index": index,
        "width": int(w),
        "height": int(h),
        "answer": p.answer,
        "seg_tokens": p.seg_tokens,
        "foreground": float(mask.mean()),
        "timings": {
            "prepare_ms": round(out.prepare_ms, 2),
            "queue_ms": round(out.queue_ms, 2),
            "model_ms": round(out.model_ms, 2),
            **{key: round(value, 2) for key, value in out.parts.items()},  # the model call in parts
            "batch_size": out.batch_size,
            "replica": out.replica,
        },
    }
    if "png" in formats:
        result["mask_png"] = masks.mask_png(mask)
    if "probability" in formats and p.probability is not None:
        result["probability_png"] = masks.probability_png(p.probability)
    if "rle" in formats:
        result["rle"] = masks.rle(mask)
    if "polygons" in formats:
        result["polygons"] = masks.polygons(mask)
    result["timings"]["encode_ms"] = round(1000 * (time.perf_counter() - start), 2)  # PNG / RLE / polygons
    return result


def create_app(cfg: ServeConfig, service: Service, jobs: JobManager | None = None) -> FastAPI:
    """The FastAPI app; the caller owns `service` (loading, closing)."""
    docs = cfg.docs
    app = FastAPI(
        title="vseg",
        version="1",
        description="Sa2VA vessel segmentation as a service: masks, chat, refine by clicks, fine-tune jobs.",
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    token = cfg.token or os.environ.get("VSEG_SERVE_TOKEN") or None
    inflight = {"n": 0}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Token, body size and concurrency limits, before a route reads anything."""
        path = request.url.path
        if token and path not in OPEN_PATHS:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.headers.get("x-api-token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "missing or wrong API token: send `Authorization: Bearer <token>`")
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "send a Content-Length header (chunked uploads are not accepted)")
            if not length.isdigit() or int(length) > cfg.max_upload_bytes:
                return _error(413, f"body of {length} bytes is over max_upload_bytes={cfg.max_upload_bytes}")
        if not path.startswith("/v1/"):
            return await call_next(request)
        if inflight["n"] >= cfg.max_concurrent:
            return _error(429, f"{cfg.max_concurrent} requests already in progress (max_concurrent); retry shortly")
        inflight["n"] += 1
        try:
            return await call_next(request)
        finally:
            inflight["n"] -= 1

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return _error(err.status, err.message)

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, err: ConfigError):
        return _error(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        return _error(422, f"invalid request: {validation_message(list(err.errors()))}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("vseg serve: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")

    def ready() -> None:
        if service.state == "starting":
            raise ApiError(503, f"the model is still {service.stage}; poll GET /health until it says ready")
        if service.state == "failed":
            raise ApiError(503, f"the model failed to load: {service.error}")

    async def run(submits: list[Callable[[], Future]]) -> list[Outcome]:
        """Each submit hands one image to the service (decoding and the processor on its pool, then the batching
        queue); the first failure in image order is the request's error."""
        ready()
        futures = [asyncio.wrap_future(submit()) for submit in submits]
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), cfg.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                503, f"no result within request_timeout_s={cfg.request_timeout_s}; the server is busy"
            ) from None
        for result in done:
            if isinstance(result, ApiError):
                raise result
            if isinstance(result, ValueError):  # an input the model cannot take (encoding / collate / refine)
                raise ApiError(422, str(result))
            if isinstance(result, BaseException):
                raise result
        return done  # type: ignore[return-value]

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        """Encoding responses (PNG, RLE, polygons) on the pool keeps the event loop free for other requests."""
        return await asyncio.get_running_loop().run_in_executor(service.pool, fn, *args)

    # ------------------------------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get(
        "/health",
        summary="ready once every worker has its model",
        responses={503: {"description": "starting or failed"}},
    )
    async def health():
        body = {"status": service.state, "replicas": len(service.replicas), "queued": len(service.batcher)}
        if service.error:
            body["error"] = service.error
        if service.state == "starting":
            body["stage"] = service.stage  # loading | warming up (compiling, recording CUDA graphs)
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @app.get("/v1/model", summary="what is loaded, where, in which dtype")
    async def model_info():
        return service.info()

    @app.post("/v1/model", summary="serve another checkpoint or a finished job's run, without a restart")
    async def model_switch(body: ModelSwitch):
        ready()
        if (body.ckpt is None) == (body.job is None):
            raise ApiError(422, "give exactly one of `ckpt` (a path under the roots) or `job` (a finished job id)")
        if body.job is not None:
            if jobs is None:
                raise ApiError(404, "fine-tune jobs are not enabled on this server")
            ckpt = str(jobs.finished_run(body.job))
        elif body.ckpt == "random":
            ckpt = "random"
        else:
            ckpt = str(confined(body.ckpt or "", cfg.roots, "ckpt"))
        await asyncio.get_running_loop().run_in_executor(None, service.switch, ckpt)
        return service.info()

    @app.post("/v1/segment", response_model=SegmentResponse, summary="masks for one or several images",
              openapi_extra=_body_schema(SegmentRequest))  # fmt: skip
    async def segment(request: Request):
        start = time.perf_counter()
        req, files = await segment_request(request, cfg)
        count = len(files) if files is not None else len(req.images)
        prompts = [p or DEFAULT_PROMPT for p in segment_prompts(req, cfg, count)]
        parsed = time.perf_counter()

        def source(i: int) -> ImageSource:
            if files is not None:
                return ImageSource(files[i][1], raw=files[i][0])
            return ImageSource(f"images[{i}]", image=req.images[i])

        sources = [source(i) for i in range(count)]
        # the probability map only when the answer needs it: its PNG, or a mask at another threshold
        needs = "probability" in req.formats or req.threshold not in (None, cfg.threshold)
        outcomes = await run(
            [
                lambda s=s, p=p: service.prepare_segment(s, req.answer, p, needs)
                for s, p in zip(sources, prompts, strict=True)
            ]
        )
        results = await off_loop(lambda: [prediction(i, o, req.formats, req.threshold) for i, o in enumerate(outcomes)])
        end = time.perf_counter()
        timings = {"parse_ms": round(1000 * (parsed - start), 2), "total_ms": round(1000 * (end - start), 2)}
        return JSONResponse({"results": results, "timings": timings})

    @app.post("/v1/chat", response_model=Prediction, summary="free generation about an image (answer=generate)")
    async def chat(body: ChatRequest):
        check_prompt(body.prompt, cfg)
        (outcome,) = await run(
            [
                lambda: service.prepare_segment(
                    ImageSource("image", image=body.image), "generate", body.prompt, "probability" in body.formats
                )
            ]
        )
        formats = body.formats if outcome.prediction.seg_tokens else []
        return JSONResponse(await off_loop(prediction, 0, outcome, formats, None))

    @app.post("/v1/refine", response_model=Prediction, summary="the mask again, with positive / negative clicks")
    async def refine(body: RefineRequest):
        if len(body.points) != len(body.labels):
            raise ApiError(
                422, f"{len(body.points)} points for {len(body.labels)} labels: give one label (1 or 0) per point"
            )
        if len(body.points) > cfg.max_points:
            raise ApiError(413, f"{len(body.points)} points, over max_points={cfg.max_points}")
        prompt = check_prompt(body.prompt, cfg) or DEFAULT_PROMPT

        def make() -> Task:
            image = load_image(body.image, cfg, "image")
            h, w = image.shape[:2]
            outside = [p for p in body.points if not (0 <= p[0] < w and 0 <= p[1] < h)]
            if outside:
                raise ApiError(422, f"points {outside[:3]} lie outside the {w}x{h} image")
            return Task("refine", "teacher_forced", image, prompt, [list(p) for p in body.points], list(body.labels))

        (outcome,) = await run([lambda: service.prepare(make)])
        return JSONResponse(await off_loop(prediction, 0, outcome, body.formats, body.threshold))

    @app.post("/v1/annotations", summary="save a corrected mask as data=polygons training data under data_root")
    async def annotations(body: AnnotationRequest):
        if cfg.data_root is None:
            raise ApiError(403, "saving is off: start the server with data_root=<folder> to save training data")
        image = load_image(body.image, cfg, "image")
        mask_raw = masks_decode(b64(body.mask, "mask"), cfg)
        if mask_raw.shape != image.shape[:2]:
            raise ApiError(
                422,
                f"mask is {mask_raw.shape[1]}x{mask_raw.shape[0]}, the image {image.shape[1]}x{image.shape[0]}: send the mask at the image's size",
            )
        if not body.text.strip() or len(body.text) > cfg.max_prompt_chars:
            raise ApiError(422, "text: a short phrase naming the object (e.g. 'blood vessels')")
        try:
            image_path, annotations_path, count = masks.save_annotation(
                Path(cfg.data_root).expanduser(), body.name, image, mask_raw, body.text
            )
        except ValueError as err:
            raise ApiError(422, str(err)) from None
        return {"image": str(image_path), "annotations": str(annotations_path), "entries": count,
                "check": f"vseg check data=polygons data.annotations={annotations_path}"}  # fmt: skip

    if jobs is not None:
        jobs.add_routes(app)

    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus SegmentRequest, which /v1/segment parses itself (JSON or multipart)."""
        if app.openapi_schema is None:
            schema = build_openapi()
            extra = SegmentRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(extra.pop("$defs", {}))
            components["SegmentRequest"] = extra
        return app.openapi_schema or schema

    app.openapi = openapi  # type: ignore[method-assign]

    return app


def masks_decode(raw: bytes, cfg: ServeConfig) -> np.ndarray:
    """A mask PNG (any common encoding, as training reads masks) -> HxW bool."""
    decode_bytes(raw, cfg, "mask")  # same size limits and error messages as images
    return mask_from_pil(Image.open(io.BytesIO(raw)), "mask")
