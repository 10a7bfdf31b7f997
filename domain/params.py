"""Reading and checking the parameters of a generation request (CONTRACT §2).

One entry point, `parse_generation`, and one error type, `InvalidRequest`, whose
message names the parameter and says how to fix it. No Flask here: the app hands in
the request's values as a mapping of names to lists of strings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from errors import InvalidRequest
from nanobanana_client import Generation

Values = Mapping[str, Sequence[str]]

MODELS = ("nano-banana", "nano-banana-pro", "nano-banana-2")
FORMATS = ("json", "text", "redirect")
RESOLUTIONS = ("1K", "2K", "4K")
_BASE_RATIOS = ("1:1", "9:16", "16:9", "3:4", "4:3", "3:2", "2:3", "5:4", "4:5", "21:9")
ASPECT_RATIOS = {
    "nano-banana": _BASE_RATIOS,
    "nano-banana-pro": (*_BASE_RATIOS, "auto"),
    "nano-banana-2": (*_BASE_RATIOS, "auto", "1:4", "4:1", "1:8", "8:1"),
}
MAX_IMAGES = {"nano-banana": 10, "nano-banana-pro": 8, "nano-banana-2": 14}
MAX_PROMPT = {"nano-banana": 5000, "nano-banana-pro": 5000, "nano-banana-2": 20000}
MAX_USER_ID = 128
MAX_IDEMPOTENCY_KEY = 255
MAX_CALLBACK_URL = 2048
MAX_TASK_ID = 128
CALLBACK_URL_NAMES = ("callback_url", "webhook_url")
MAX_NUM_IMAGES = 4
IMAGE_URL_NAMES = ("image_url", "image", "imageUrl", "image_urls")
USER_ID_NAMES = ("user_id", "user", "userId")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")
# What each field of a JSON body must be (CONTRACT §2); fields not named here are not read.
TEXT_FIELDS = (
    "prompt",
    "model",
    "resolution",
    "aspect_ratio",
    "format",
    "token",
    "idempotency_key",
    *USER_ID_NAMES,
    *CALLBACK_URL_NAMES,
    "from_task",
)
WHOLE_NUMBER_FIELDS = ("num_images",)
NUMBER_FIELDS = ("wait",)
FLAG_FIELDS = ("reset",)


@dataclass(frozen=True)
class GenerationRequest:
    generation: Generation  # the images here are only those the caller named
    user_id: str | None
    reset: bool
    wait: float
    idempotency_key: str | None = None
    callback_url: str | None = None  # checked for its form here; where it leads, by webhooks.check_target
    from_task: str | None = None  # a task of this caller whose picture to edit (CONTRACT §9)
    preference_applied: str | None = None  # the Prefer header's wish that set `wait`, for Preference-Applied


def json_values(body: Any) -> dict[str, list[str]]:
    """A JSON body's fields, each checked for the type it names, as the same mapping the query gives."""
    if not isinstance(body, dict):
        raise InvalidRequest('The request body must be a JSON object, like {"prompt": "a red apple"}.')
    return {name: _json_field(name, value) for name, value in body.items() if value is not None and _known(name)}


def _known(name: str) -> bool:
    return name in (*TEXT_FIELDS, *IMAGE_URL_NAMES, *WHOLE_NUMBER_FIELDS, *NUMBER_FIELDS, *FLAG_FIELDS)


def _json_field(name: str, value: Any) -> list[str]:
    if name in IMAGE_URL_NAMES:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in items):
            raise InvalidRequest(
                f'{name} must be a web address or a list of them, like ["https://example.com/a.png"].'
            )
        return [_text(name, item) for item in items]
    if name in WHOLE_NUMBER_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{name} must be a whole number, like 2.")
        return [str(value)]
    if name in NUMBER_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InvalidRequest(f"{name} must be a number of seconds, like 10.")
        return [str(value)]
    if name in FLAG_FIELDS:
        if not isinstance(value, (bool, str)):
            raise InvalidRequest(f"{name} must be true or false.")
        return [str(value).lower()]
    if not isinstance(value, str):
        raise InvalidRequest(f'{name} must be text (a JSON string), like "{name}": "a red apple".')
    return [_text(name, value)]


def _text(name: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"{name} holds something that is not text (a lone surrogate); send it as UTF-8."
        ) from None
    return value


def parse_format(values: Values) -> str:
    """The response format: json (default), text or redirect."""
    fmt = (_first(values, "format") or "json").strip().lower()
    if fmt not in FORMATS:
        raise InvalidRequest("format must be json, text or redirect.")
    return fmt


def parse_user_id(values: Values) -> str | None:
    """The conversation's name, 1 to 128 characters; blank means none."""
    user_id = (_first(values, *USER_ID_NAMES) or "").strip()
    if len(user_id) > MAX_USER_ID:
        raise InvalidRequest(f"user_id is {len(user_id)} characters long; please keep it to {MAX_USER_ID} or fewer.")
    return user_id or None


def parse_generation(
    values: Values, polling_window: float, idempotency_header: str | None = None, prefer_header: str | None = None
) -> GenerationRequest:
    """Check every generation parameter and gather them into one request."""
    model = _model(values)
    generation = Generation(
        prompt=_prompt(values, model),
        model=model,
        image_urls=_image_urls(values, model),
        aspect_ratio=_aspect_ratio(values, model),
        resolution=_resolution(values, model),
        num_images=_num_images(values, model),
    )
    wait, preference_applied = _wait(values, polling_window, prefer_header)
    return GenerationRequest(
        generation=generation,
        user_id=parse_user_id(values),
        reset=_flag(values, "reset"),
        wait=wait,
        idempotency_key=_idempotency_key(values, idempotency_header),
        callback_url=_callback_url(values),
        from_task=_from_task(values),
        preference_applied=preference_applied,
    )


def _first(values: Values, *names: str) -> str | None:
    for name in names:
        found = values.get(name)
        if found:
            return found[0]
    return None


def _model(values: Values) -> str:
    model = (_first(values, "model") or "nano-banana").strip().lower()
    if model not in MODELS:
        raise InvalidRequest(
            f"model {_quote(model)} is not known; use nano-banana, nano-banana-pro or nano-banana-2."
        )
    return model


def _prompt(values: Values, model: str) -> str:
    prompt = (_first(values, "prompt") or "").strip()
    if not prompt:
        raise InvalidRequest("Please add a prompt, for example ?prompt=a+red+apple")
    limit = MAX_PROMPT[model]
    if len(prompt) > limit:
        raise InvalidRequest(
            f"The prompt is {len(prompt)} characters long; please shorten it to {limit} characters or fewer."
        )
    return prompt


def _image_urls(values: Values, model: str) -> tuple[str, ...]:
    urls = [
        part.strip()
        for name in IMAGE_URL_NAMES
        for value in values.get(name, ())
        for part in value.split(",")
        if part.strip()
    ]
    for url in urls:
        parts = urlsplit(url)
        if any(c.isspace() for c in url):
            raise InvalidRequest(
                f"image_url {_quote(url)} has a space in it, and a web address has none; "
                "write each space as %20, or copy the address again from the browser."
            )
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise InvalidRequest(
                f"image_url {_quote(url)} is not a web address; use a link that starts with http:// or https://."
            )
    limit = MAX_IMAGES[model]
    if len(urls) > limit:
        raise InvalidRequest(f"{len(urls)} images were given, but {model} takes at most {limit}; please send fewer.")
    return tuple(urls)


def _aspect_ratio(values: Values, model: str) -> str | None:
    ratio = (_first(values, "aspect_ratio") or "").strip().lower()
    if not ratio:
        return None
    allowed = ASPECT_RATIOS[model]
    if ratio not in allowed:
        raise InvalidRequest(
            f"aspect_ratio {_quote(ratio)} does not work with {model}; use one of {' '.join(allowed)}."
        )
    return ratio


def _resolution(values: Values, model: str) -> str | None:
    resolution = (_first(values, "resolution") or "").strip().upper()
    if not resolution:
        return None
    if model == "nano-banana":
        raise InvalidRequest(
            "resolution works only with model=nano-banana-pro or model=nano-banana-2; "
            "leave it out or choose one of those."
        )
    if resolution not in RESOLUTIONS:
        raise InvalidRequest("resolution must be 1K, 2K or 4K.")
    return resolution


def _num_images(values: Values, model: str) -> int:
    raw = (_first(values, "num_images") or "1").strip()
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_NUM_IMAGES:
        raise InvalidRequest(f"num_images must be a whole number from 1 to {MAX_NUM_IMAGES}.")
    if count > 1 and model != "nano-banana":
        raise InvalidRequest("num_images above 1 works only with model=nano-banana; leave it out for this model.")
    return count


def _flag(values: Values, name: str) -> bool:
    raw = (_first(values, name) or "").strip().lower()
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise InvalidRequest(f"{name} must be 1, true or yes (or leave it out).")


def _wait(values: Values, polling_window: float, prefer_header: str | None) -> tuple[float, str | None]:
    """Seconds to wait, and the Prefer wish that chose them (an explicit `wait` wins over the header)."""
    raw = (_first(values, "wait") or "").strip()
    if not raw:
        preferred = preferred_wait(prefer_header)
        if preferred is None:
            return polling_window, None
        seconds = min(preferred, polling_window)
        return seconds, "respond-async" if preferred == 0 else f"wait={seconds:g}"
    return _seconds(raw, polling_window), None


def preferred_wait(header: str | None) -> float | None:
    """RFC 7240: `Prefer: respond-async` is no wait at all, `Prefer: wait=N` is N seconds; None: no such wish."""
    found = None
    for preference in (header or "").split(","):
        name, _, value = preference.split(";", 1)[0].strip().partition("=")
        name = name.strip().lower()
        if name == "respond-async":
            return 0.0
        if name == "wait" and found is None:
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                continue
            found = seconds if math.isfinite(seconds) and seconds >= 0 else None
    return found


def _seconds(raw: str, polling_window: float) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest(f"wait must be a number of seconds from 0 to {polling_window:g}.")
    return min(seconds, polling_window)


def _from_task(values: Values) -> str | None:
    task_id = (_first(values, "from_task") or "").strip()
    if len(task_id) > MAX_TASK_ID:
        raise InvalidRequest(f"from_task must be a task_id, at most {MAX_TASK_ID} characters.")
    return task_id or None


def _callback_url(values: Values) -> str | None:
    url = (_first(values, *CALLBACK_URL_NAMES) or "").strip()
    if not url:
        return None
    parts = urlsplit(url)
    if len(url) > MAX_CALLBACK_URL or any(c.isspace() for c in url) or parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequest(
            f"callback_url {_quote(url)} is not a web address; use one that starts with https:// (or http://), "
            f"at most {MAX_CALLBACK_URL} characters."
        )
    return url


def _idempotency_key(values: Values, header: str | None) -> str | None:
    """The Idempotency-Key header, else the idempotency_key parameter; 1 to 255 characters."""
    key = header if header is not None else _first(values, "idempotency_key")
    if key is None:
        return None
    key = key.strip()
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(
            f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} characters, like a random id made once per picture."
        )
    return key


def _quote(text: str, limit: int = 80) -> str:
    """The caller's value, shortened, with control characters made visible, for a one-line message."""
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return "'" + "".join(c if c.isprintable() else "?" for c in shown) + "'"
