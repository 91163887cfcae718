"""Request and response shapes (they make the OpenAPI schema) and turning a request into checked inputs.

Every problem with a request is an `ApiError`: an HTTP 4xx status and one sentence saying what to change.
Limits come from `ServeConfig` and are checked before anything costly: the body size before reading it
(middleware), an image's pixel count from its header before decoding it, file paths against the roots the
server was started with.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vseg.config import ServeConfig
from vseg.data.io import DataFileError, rgb_array

FORMATS = ("png", "rle", "polygons", "probability")


class ApiError(Exception):
    """A request the service refuses: HTTP `status` and a message saying what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def __reduce__(self):  # raised in a preparation process, re-raised here with its status
        return (type(self), (self.status, self.message))


class ImageIn(BaseModel):
    """An image: base64 bytes (PNG, JPEG, TIF, ...; a `data:` URL is fine) or a file under the server's roots."""

    model_config = ConfigDict(extra="forbid")
    data: str | None = Field(None, description="base64 of the image file")
    path: str | None = Field(None, description="a file under one of the server's `roots`")


class SegmentRequest(BaseModel):
    """POST /v1/segment (JSON). Multipart: files `image` (repeatable), fields `prompt` (repeatable), `answer`,
    `threshold`, `formats` (comma-separated)."""

    model_config = ConfigDict(extra="forbid")
    images: list[ImageIn] = Field(..., min_length=1, description="one or several images")
    prompt: str | None = Field(None, description="one prompt for every image (default: the vessel prompt)")
    prompts: list[str] | None = Field(None, description="or one prompt per image")
    answer: Literal["teacher_forced", "generate"] = "teacher_forced"
    threshold: float | None = Field(None, gt=0, lt=1, description="sigmoid threshold (default: the server's)")
    formats: list[Literal["png", "rle", "polygons", "probability"]] = Field(
        default_factory=lambda: ["png"], description="mask encodings to return"
    )


class ChatRequest(BaseModel):
    """POST /v1/chat: free generation about one image (answer=generate); a [SEG] in the answer brings a mask."""

    model_config = ConfigDict(extra="forbid")
    image: ImageIn
    prompt: str = Field(..., min_length=1)
    formats: list[Literal["png", "rle", "polygons", "probability"]] = Field(default_factory=lambda: ["png"])


class RefineRequest(BaseModel):
    """POST /v1/refine: the mask again with clicks; 1 = vessel here, 0 = not vessel here."""

    model_config = ConfigDict(extra="forbid")
    image: ImageIn
    prompt: str | None = None
    points: list[tuple[float, float]] = Field(default_factory=list, description="(x, y) in image pixels")
    labels: list[Literal[0, 1]] = Field(default_factory=list)
    threshold: float | None = Field(None, gt=0, lt=1)
    formats: list[Literal["png", "rle", "polygons", "probability"]] = Field(
        default_factory=lambda: ["png", "probability"]
    )


class AnnotationRequest(BaseModel):
    """POST /v1/annotations: a corrected mask saved as `data=polygons` training data under `data_root`."""

    model_config = ConfigDict(extra="forbid")
    image: ImageIn
    mask: str = Field(..., description="base64 PNG of the mask as corrected (non-zero = vessel), image-sized")
    name: str = Field(..., description="file stem: letters, digits, '.', '_', '-'")
    text: str = Field("blood vessels", description="the object's phrase")


class ModelSwitch(BaseModel):
    """POST /v1/model: serve another checkpoint (under the roots) or a finished job's run, without a restart."""

    model_config = ConfigDict(extra="forbid")
    ckpt: str | None = None
    job: str | None = None


class Prediction(BaseModel):
    index: int
    width: int
    height: int
    answer: str
    seg_tokens: int
    foreground: float = Field(..., description="fraction of pixels in the mask")
    mask_png: str | None = Field(None, description="base64 PNG, 0 / 255")
    probability_png: str | None = Field(None, description="base64 8-bit PNG of the foreground probability")
    rle: dict[str, Any] | None = Field(None, description="COCO compressed RLE")
    polygons: list[list[float]] | None = Field(None, description="COCO polygons whose union is the mask")
    timings: dict[str, Any]


class SegmentResponse(BaseModel):
    results: list[Prediction]
    timings: dict[str, float]


# ---------------------------------------------------------------------------------------------- parsing
def validation_message(err: ValidationError | list[dict[str, Any]]) -> str:
    """Pydantic's errors as one line: `images.0.data: Input should be a valid string; answer: ...`."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",)) or "body"
        parts.append(f"{where}: {e.get('msg')}")
    return "; ".join(parts)


def parse(model: type[BaseModel], payload: Any) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        raise ApiError(422, f"invalid request: {validation_message(err)}") from None


def confined(path: str, roots: list[str], what: str) -> Path:
    """`path` resolved (symlinks too) and inside one of `roots`; otherwise a 403 naming the rule."""
    if not roots:
        raise ApiError(
            403, f"{what}: file paths are disabled; send the data itself (or start the server with roots=[...])"
        )
    resolved = Path(path).expanduser().resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return resolved
    raise ApiError(403, f"{what}: {path} is outside the server's roots {roots}")


def decode_bytes(raw: bytes, cfg: ServeConfig, what: str) -> np.ndarray:
    """Image file bytes -> HxWx3 uint8, the pixel count checked from the header before decoding."""
    if not raw:
        raise ApiError(400, f"{what}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > cfg.max_pixels:
                raise ApiError(
                    413,
                    f"{what}: {image.width}x{image.height} pixels is over the limit of {cfg.max_pixels}; downscale it",
                )
            if image.width < 2 or image.height < 2:
                raise ApiError(400, f"{what}: {image.width}x{image.height} is too small to segment")
            image.load()
            return rgb_array(image, what)
    except ApiError:
        raise
    except DataFileError as err:
        raise ApiError(415, str(err)) from None
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise ApiError(
            415, f"{what}: not an image file PIL can read ({type(err).__name__}); send PNG, JPEG or TIF"
        ) from None


def b64(data: str, what: str) -> bytes:
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: not valid base64") from None


def load_image(image: ImageIn, cfg: ServeConfig, what: str) -> np.ndarray:
    if (image.data is None) == (image.path is None):
        raise ApiError(422, f"{what}: give exactly one of `data` (base64) or `path`")
    if image.data is not None:
        return decode_bytes(b64(image.data, what), cfg, what)
    path = confined(image.path or "", cfg.roots, what)
    if not path.is_file():
        raise ApiError(404, f"{what}: {image.path}: no such file")
    if path.stat().st_size > cfg.max_upload_bytes:
        raise ApiError(413, f"{what}: {image.path} is over max_upload_bytes={cfg.max_upload_bytes}")
    return decode_bytes(path.read_bytes(), cfg, what)


def check_prompt(prompt: str | None, cfg: ServeConfig, what: str = "prompt") -> str | None:
    if prompt is None:
        return None
    if not prompt.strip():
        raise ApiError(422, f"{what}: empty; leave it out for the default vessel prompt")
    if len(prompt) > cfg.max_prompt_chars:
        raise ApiError(413, f"{what}: {len(prompt)} characters, over max_prompt_chars={cfg.max_prompt_chars}")
    if "[SEG]" in prompt or "<IMG_CONTEXT>" in prompt:
        raise ApiError(422, f"{what}: must not contain the model's special tokens ([SEG], <IMG_CONTEXT>)")
    return prompt


def segment_prompts(req: SegmentRequest, cfg: ServeConfig, count: int) -> list[str | None]:
    """One checked prompt per image of a request of `count` images (the images are decoded later, on the pool)."""
    if count > cfg.max_images:
        raise ApiError(413, f"{count} images in one request, over max_images={cfg.max_images}; split it")
    if req.prompt is not None and req.prompts is not None:
        raise ApiError(422, "give `prompt` (one for all) or `prompts` (one per image), not both")
    if req.prompts is not None and len(req.prompts) != count:
        raise ApiError(422, f"{len(req.prompts)} prompts for {count} images: give one per image")
    prompts = req.prompts if req.prompts is not None else [req.prompt] * count
    return [check_prompt(p, cfg, f"prompts[{i}]") for i, p in enumerate(prompts)]


async def segment_request(request: Any, cfg: ServeConfig) -> tuple[SegmentRequest, list[tuple[bytes, str]] | None]:
    """A JSON or multipart /v1/segment request; multipart images come back as (file bytes, name) to decode,
    JSON ones stay in the request (`ImageIn`)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form(max_files=cfg.max_images + 1, max_fields=64)
        files = [f for f in form.getlist("image") if hasattr(f, "read")]
        if not files:
            raise ApiError(422, "multipart request without an `image` file field")
        if len(files) > cfg.max_images:
            raise ApiError(413, f"{len(files)} images in one request, over max_images={cfg.max_images}; split it")
        prompts = [str(p) for p in form.getlist("prompt")]
        fields: dict[str, Any] = {"images": [{"data": ""} for _ in files]}
        if len(prompts) > 1:
            fields["prompts"] = prompts
        elif prompts:
            fields["prompt"] = prompts[0]
        for key in ("answer", "threshold"):
            if form.get(key) is not None:
                fields[key] = str(form.get(key))
        if form.get("formats") is not None:
            fields["formats"] = [x.strip() for x in str(form.get("formats")).split(",") if x.strip()]
        req = parse(SegmentRequest, fields)
        return req, [(await f.read(), f"images[{i}] ({f.filename})") for i, f in enumerate(files)]
    if kind.split(";")[0].strip() not in ("application/json", ""):
        raise ApiError(415, f"content-type {kind!r}: send application/json or multipart/form-data")
    return parse(SegmentRequest, await json_body(request)), None


async def json_body(request: Any) -> Any:
    raw = await request.body()
    if not raw:
        raise ApiError(400, "empty body: send a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"body is not valid JSON ({err})") from None
