"""Reading what a request sent: the query string, a form or a JSON body, merged into one mapping of names to
lists of strings, which is what domain/params.py reads. A body of another kind is refused, not ignored."""

from __future__ import annotations

import json

from flask import g, request

from domain.params import json_values
from errors import InvalidRequest
from web.uploads import UPLOAD_ENDPOINT

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def request_values() -> dict[str, list[str]]:
    """Query string, form and JSON body merged (read once per request)."""
    if "values" not in g:
        g.values = _merged_values()
    return g.values


def _merged_values() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    sources = [request.args.to_dict(flat=False)]
    if request.method == "POST" and request.endpoint != UPLOAD_ENDPOINT:  # an upload's body is its picture
        sources.append(body_values())
    for source in sources:
        for name, items in source.items():
            values.setdefault(name, []).extend(items)
    return values


def body_values() -> dict[str, list[str]]:
    """The fields of a form or JSON body."""
    if request.is_json:
        raw = request.get_data(cache=True)
        return json_values(parse_json(raw)) if raw.strip() else {}
    if request.mimetype in FORM_TYPES:
        return request.form.to_dict(flat=False)
    if request.content_length or request.get_data(cache=True):
        sent_as = request.mimetype or "without a Content-Type"
        raise InvalidRequest(
            f"The body was sent {'as ' + sent_as if request.mimetype else sent_as}; send it as JSON "
            "(Content-Type: application/json) or as a form (Content-Type: application/x-www-form-urlencoded)."
        )
    return {}


def parse_json(raw: bytes):
    """A JSON body, or InvalidRequest saying what is wrong with it (nested too deeply for Python to read, too)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidRequest("The request body is JSON nested too deeply. Please send a flat object.") from None
    except ValueError as error:
        where = f" ({error.msg} at line {error.lineno}, column {error.colno})" if hasattr(error, "msg") else ""
        raise InvalidRequest(
            f"The request body is not valid JSON{where}. Check its quotes, commas and brackets, "
            'like {"prompt": "a red apple"}.'
        ) from None
