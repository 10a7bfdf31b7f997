"""The rest of what the service serves: the page, lasting copies of pictures, credits, health, metrics, OpenAPI."""

from __future__ import annotations

import os

from flask import Blueprint, render_template, send_file

from domain.media import CACHE_CONTROL, MAX_AGE
from domain.params import page_context
from errors import NotFound
from web import openapi, telemetry
from web.parts import parts
from web.render import external_url

bp = Blueprint("ops", __name__)

# A copy came from elsewhere: an SVG must not run anything in this origin.
MEDIA_HEADERS = {
    "Cache-Control": CACHE_CONTROL,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
    "X-Content-Type-Options": "nosniff",
}


@bp.get("/", endpoint="home")
def home():
    """The page to try it: a prompt box, the picture, and this browser's conversation."""
    return render_template("index.html", **page_context())


@bp.get("/media/<name>", endpoint="media")
def media_file(name: str):
    """A lasting copy or an upload kept in the local folder: never changes, so it may be cached for a year."""
    path = parts().uploads.media.path(name)  # the local folder's, whether MEDIA_STORE=local or unset
    if path is None or not os.path.isfile(path):
        raise NotFound("There is no picture at this address.")
    response = send_file(path, max_age=MAX_AGE, conditional=True)
    response.headers.update(MEDIA_HEADERS)
    return response


@bp.get("/nanobanana/credits")
def credits():
    keys = parts().client.credits()
    return {"keys": [{"key": k.key, "credits": k.credits, "usable": k.usable} for k in keys]}


@bp.get("/metrics")
def metrics():
    return telemetry.exposition(parts().metrics, parts().store.queue_depth)


@bp.get("/openapi.json", endpoint="openapi")
def openapi_document():
    return openapi.document(external_url("/"), tokens_required=bool(parts().settings.access_tokens))


@bp.get("/healthz")
def healthz():
    """200 while the service can record generations; 503 "degraded" while its store cannot be reached."""
    settings = parts().settings
    store_ok = parts().store.ping()
    body = {
        "status": "ok" if store_ok else "degraded",
        "configured": settings.configured,
        "api_keys": len(settings.api_keys),
        "store": settings.store_name,
        "store_ok": store_ok,
        "demo": settings.demo,
    }
    return body, 200 if store_ok else 503
