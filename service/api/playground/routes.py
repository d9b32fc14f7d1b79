"""The web playground: the page at `/` and its static files (no key), and the model files it runs in the
browser and the cell finder's report it offers as units (under /v1, with the API key like every /v1 route).

The page is plain HTML, CSS and ES modules in static/ beside this file. onnxruntime-web's files are served
from static/ort/ when the project's setup has installed them there (`make web`); without them the
page still works against the server and says that running in the browser is unavailable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from exports.contract import CELLS_FILE
from service.api.deps import ServiceDep
from service.api.errors import NATIVE_ERRORS
from service.errors import NotFound
from service.serving.registry import VARIANT_FILES

STATIC = Path(__file__).resolve().parent / "static"
ORT_DIR = STATIC / "ort"
ORT_ENTRY = "ort.wasm.min.mjs"  # the wasm-only ES module build of onnxruntime-web
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
# What the page may do, as a browser enforces it: load its own scripts and styles, compile
# onnxruntime-web's WebAssembly, talk to this server only, and never be framed by another site
# (clickjacking). nosniff keeps a browser from running a file as other than its declared type.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'wasm-unsafe-eval'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# The page's own files change with the code: always revalidated. onnxruntime-web's are big and versioned.
NO_CACHE = {"Cache-Control": "no-cache", **SECURITY_HEADERS}
LONG_CACHE = {"Cache-Control": "public, max-age=86400", **SECURITY_HEADERS}

router = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/v1", tags=["playground"], responses=NATIVE_ERRORS)


def ort_web_version() -> str | None:
    """The installed onnxruntime-web version, or None when its files are not there."""
    if not (ORT_DIR / ORT_ENTRY).is_file():
        return None
    version = ORT_DIR / "VERSION"
    return version.read_text().strip() if version.is_file() else "unknown"


@router.get("/")
async def page() -> FileResponse:
    """The playground page."""
    return FileResponse(STATIC / "index.html", media_type=MEDIA_TYPES[".html"], headers=NO_CACHE)


@router.get("/playground.json")
async def playground_config(request: Request, service: ServiceDep) -> JSONResponse:
    """What the page needs before it can ask for anything: is a key needed, can it run models itself,
    which model is the default (as public as /readyz)."""
    body = {
        "api_key_required": request.app.state.keyring.enabled,
        "ort_web": ort_web_version(),
        "default_model": service.registry.default,
    }
    return JSONResponse(body, headers=NO_CACHE)


@router.get("/static/{path:path}")
async def static_file(path: str) -> FileResponse:
    """A file of the page, or of onnxruntime-web when installed."""
    file = (STATIC / path).resolve()
    if not file.is_relative_to(STATIC) or not file.is_file() or file.suffix not in MEDIA_TYPES:
        raise NotFound(f"no static file {path!r}")
    headers = LONG_CACHE if file.is_relative_to(ORT_DIR) else NO_CACHE
    return FileResponse(file, media_type=MEDIA_TYPES[file.suffix], headers=headers)


@api.get(
    "/models/{model_id}/onnx",
    response_class=FileResponse,
    responses={200: {"description": "the .onnx file", "content": {"application/octet-stream": {}}}},
)
async def model_file(
    model_id: str, service: ServiceDep, variant: Literal["fp32", "int8", "fp16"] = Query("fp32")
) -> FileResponse:
    """The model's .onnx file (fp32 by default, or its int8/fp16 variant), to run it elsewhere, e.g. in a browser."""
    model = service.registry.get(model_id)
    file = model.folder / VARIANT_FILES[variant]
    if not file.is_file():
        raise NotFound(f"model {model_id!r} has no {variant} file", field="variant")
    return FileResponse(file, media_type="application/octet-stream", filename=f"{model_id}.{file.name}")


@api.get("/models/{model_id}/cells")
async def model_cells(model_id: str, service: ServiceDep) -> JSONResponse:
    """The cell finder's report for the model (its best units per text feature), when one was made."""
    model = service.registry.get(model_id)
    file = model.folder / CELLS_FILE
    if not file.is_file():
        raise NotFound(f"model {model_id!r} has no cell report; make one with `charstream cells`")
    report: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    return JSONResponse(report, headers=NO_CACHE)
