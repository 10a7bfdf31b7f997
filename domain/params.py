"""Reading and checking the parameters of a generation request (CONTRACT §2).

Every parameter is described once, in `FIELDS`, and each model's limits once, in `MODEL_TABLE`: the
checks here, the OpenAPI document (web/openapi.py) and the try-it page (`page_context`) all read them.
One entry point, `parse_generation`, and one error type, `InvalidRequest`, whose message names the
parameter and says how to fix it. No Flask here: the app hands in the request's values as a mapping
of names to lists of strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import SplitResult, urlsplit

from config import IDEMPOTENCY_TTL, in_words
from errors import InvalidRequest
from nanobanana_client import MODEL_PATHS, Generation

Values = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Model:
    """What one upstream model takes."""

    name: str
    label: str  # as the try-it page shows it
    max_prompt: int  # characters
    max_images: int  # images to edit or combine
    aspect_ratios: tuple[str, ...]
    takes_resolution: bool = False
    takes_num_images: bool = False  # more than one picture from one request


_BASE_RATIOS = ("1:1", "9:16", "16:9", "3:4", "4:3", "3:2", "2:3", "5:4", "4:5", "21:9")
MODEL_TABLE = {
    model.name: model
    for model in (
        Model(
            "nano-banana",
            label="Nano Banana",
            max_prompt=5000,
            max_images=10,
            aspect_ratios=_BASE_RATIOS,
            takes_num_images=True,
        ),
        Model(
            "nano-banana-pro",
            label="Nano Banana Pro",
            max_prompt=5000,
            max_images=8,
            aspect_ratios=(*_BASE_RATIOS, "auto"),
            takes_resolution=True,
        ),
        Model(
            "nano-banana-2",
            label="Nano Banana 2",
            max_prompt=20000,
            max_images=14,
            aspect_ratios=(*_BASE_RATIOS, "auto", "1:4", "4:1", "1:8", "8:1"),
            takes_resolution=True,
        ),
    )
}
MODELS = tuple(MODEL_PATHS)  # the client's endpoints name the models; a test checks each has its row above
DEFAULT_MODEL = "nano-banana"
DEFAULT_FORMAT = "json"
DEFAULT_NUM_IMAGES = 1
LONGEST_PROMPT = max(model.max_prompt for model in MODEL_TABLE.values())
MOST_IMAGES = max(model.max_images for model in MODEL_TABLE.values())
RESOLUTION_MODELS = tuple(name for name, model in MODEL_TABLE.items() if model.takes_resolution)
NUM_IMAGES_MODELS = tuple(name for name, model in MODEL_TABLE.items() if model.takes_num_images)
FORMATS = ("json", "text", "redirect")
RESOLUTIONS = ("1K", "2K", "4K")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")
MAX_USER_ID = 128
MAX_IDEMPOTENCY_KEY = 255
MAX_CALLBACK_URL = 2048
MAX_TASK_ID = 128
MAX_NUM_IMAGES = 4


class Kind(StrEnum):
    """What a field holds, and so the type it must have in a JSON body."""

    TEXT = "text"
    URL = "url"  # text that is a web address
    URL_LIST = "url list"  # a web address or a list of them
    WHOLE_NUMBER = "whole number"
    NUMBER = "number"
    FLAG = "flag"


@dataclass(frozen=True)
class Field:
    """One generation parameter. A limit that depends on the model is the largest here; MODEL_TABLE has each."""

    name: str
    kind: Kind
    help: str
    aliases: tuple[str, ...] = ()
    enum: tuple[str, ...] = ()
    min_length: int | None = None
    max_length: int | None = None
    max_items: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    default: str | int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a caller may send it under, its own first."""
        return (self.name, *self.aliases)


def _either(words: Iterable[str]) -> str:
    """The choices as a sentence lists them: "a, b or c"."""
    *others, last = words
    return f"{', '.join(others)} or {last}" if others else last


def _by_model(fact: str) -> str:
    return ", ".join(f"{getattr(model, fact)} with {name}" for name, model in MODEL_TABLE.items())


FIELDS = (
    Field(
        "prompt",
        Kind.TEXT,
        f"What to make or how to edit; the most characters, by model: {_by_model('max_prompt')}",
        min_length=1,
        max_length=LONGEST_PROMPT,
    ),
    Field(
        "image_url",
        Kind.URL_LIST,
        f"Images to edit or combine; the most images, by model: {_by_model('max_images')}",
        aliases=("image", "imageUrl", "image_urls"),
        max_items=MOST_IMAGES,
    ),
    Field("model", Kind.TEXT, "Which upstream model makes the picture", enum=MODELS, default=DEFAULT_MODEL),
    Field("resolution", Kind.TEXT, f"Only with {_either(RESOLUTION_MODELS)}", enum=RESOLUTIONS),
    Field(
        "user_id",
        Kind.TEXT,
        "Names the conversation whose last picture is remembered",
        aliases=("user", "userId"),
        min_length=1,
        max_length=MAX_USER_ID,
    ),
    Field(
        "aspect_ratio",
        Kind.TEXT,
        "The ratios, by model: "
        + "; ".join(f"{' '.join(model.aspect_ratios)} with {name}" for name, model in MODEL_TABLE.items()),
        enum=tuple(dict.fromkeys(ratio for model in MODEL_TABLE.values() for ratio in model.aspect_ratios)),
    ),
    Field(
        "num_images",
        Kind.WHOLE_NUMBER,
        f"Pictures to make; above 1 only with {_either(NUM_IMAGES_MODELS)}",
        minimum=1,
        maximum=MAX_NUM_IMAGES,
        default=DEFAULT_NUM_IMAGES,
    ),
    Field(
        "reset",
        Kind.FLAG,
        "Forget this user's remembered picture first",
        enum=tuple(word for word in (*TRUE_WORDS, *FALSE_WORDS) if word),
    ),
    Field("wait", Kind.NUMBER, "Seconds to wait; clamped to the polling window", minimum=0),
    Field(
        "format",
        Kind.TEXT,
        "How to answer: text gives the image URLs one per line, redirect a 302 to the first image",
        enum=FORMATS,
        default=DEFAULT_FORMAT,
    ),
    Field("token", Kind.TEXT, "The access token, for callers that cannot send headers"),
    Field(
        "idempotency_key",
        Kind.TEXT,
        f"The same key (with the same parameters) within {in_words(IDEMPOTENCY_TTL)} is the same picture, paid once",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY,
    ),
    Field(
        "callback_url",
        Kind.URL,
        "Where to POST a signed webhook when the task ends (Standard Webhooks)",
        aliases=("webhook_url",),
        max_length=MAX_CALLBACK_URL,
    ),
    Field(
        "from_task",
        Kind.TEXT,
        "A task of yours whose picture to edit, instead of the remembered one",
        max_length=MAX_TASK_ID,
    ),
)
FIELD = {field.name: field for field in FIELDS}
ACCEPTED_NAMES = {name: field for field in FIELDS for name in field.names}  # a JSON body's other fields are not read


def page_context() -> dict[str, Any]:
    """What the try-it page shows: the models to choose from, the one chosen at first, the longest prompt any of
    them takes, and what each model takes (its page script offers only those aspect ratios and resolutions)."""
    return {
        "models": [MODEL_TABLE[name] for name in MODELS],
        "default_model": DEFAULT_MODEL,
        "longest_prompt": LONGEST_PROMPT,
        "model_limits": {
            name: {
                "max_prompt": model.max_prompt,
                "aspect_ratios": list(model.aspect_ratios),
                "resolutions": list(RESOLUTIONS) if model.takes_resolution else [],
            }
            for name, model in MODEL_TABLE.items()
        },
    }


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
    return {
        name: _json_field(name, ACCEPTED_NAMES[name].kind, value)
        for name, value in body.items()
        if value is not None and _known(name)
    }


def _known(name: str) -> bool:
    return name in ACCEPTED_NAMES


def _json_field(name: str, kind: Kind, value: Any) -> list[str]:
    match kind:
        case Kind.URL_LIST:
            return _json_url_list(name, value)
        case Kind.WHOLE_NUMBER:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{name} must be a whole number, like 2.")
            return [str(value)]
        case Kind.NUMBER:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise InvalidRequest(f"{name} must be a number of seconds, like 10.")
            return [str(value)]
        case Kind.FLAG:
            if not isinstance(value, (bool, str)):
                raise InvalidRequest(f"{name} must be true or false.")
            return [str(value).lower()]
    if not isinstance(value, str):
        raise InvalidRequest(f'{name} must be text (a JSON string), like "{name}": "a red apple".')
    return [_text(name, value)]


def _json_url_list(name: str, value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        raise InvalidRequest(f'{name} must be a web address or a list of them, like ["https://example.com/a.png"].')
    return [_text(name, item) for item in items]


def _text(name: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} holds something that is not text (a lone surrogate); send it as UTF-8.") from None
    return value


def parse_format(values: Values) -> str:
    """The response format: json (default), text or redirect."""
    fmt = (_first(values, "format") or DEFAULT_FORMAT).strip().lower()
    if fmt not in FORMATS:
        raise InvalidRequest(f"format must be {_either(FORMATS)}.")
    return fmt


def parse_status_wait(values: Values, polling_window: float) -> float:
    """Seconds a status read may wait for its task to end: none unless asked (a long poll), at most the window."""
    raw = (_first(values, "wait") or "").strip()
    return _seconds(raw, polling_window) if raw else 0.0


def parse_user_id(values: Values) -> str | None:
    """The conversation's name, 1 to MAX_USER_ID characters; blank means none."""
    user_id = (_first(values, *FIELD["user_id"].names) or "").strip()
    if len(user_id) > MAX_USER_ID:
        raise InvalidRequest(f"user_id is {len(user_id)} characters long; please keep it to {MAX_USER_ID} or fewer.")
    if not user_id.isprintable():  # control characters, among them the mark of a chat's conversations
        raise InvalidRequest("user_id may hold only printable characters: no line breaks, tabs or control codes.")
    return user_id or None


def parse_generation(
    values: Values, polling_window: float, idempotency_header: str | None = None, prefer_header: str | None = None
) -> GenerationRequest:
    """Check every generation parameter and gather them into one request."""
    model = _model(values)
    generation = Generation(
        prompt=_prompt(values, model),
        model=model.name,
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


def _model(values: Values) -> Model:
    name = (_first(values, "model") or DEFAULT_MODEL).strip().lower()
    if name not in MODELS:
        raise InvalidRequest(f"model {_quote(name)} is not known; use {_either(MODELS)}.")
    return MODEL_TABLE[name]


def _prompt(values: Values, model: Model) -> str:
    prompt = (_first(values, "prompt") or "").strip()
    if not prompt:
        raise InvalidRequest("Please add a prompt, for example ?prompt=a+red+apple")
    if len(prompt) > model.max_prompt:
        raise InvalidRequest(
            f"The prompt is {len(prompt)} characters long; please shorten it to {model.max_prompt} characters or fewer."
        )
    return prompt


def _image_urls(values: Values, model: Model) -> tuple[str, ...]:
    urls = [
        part.strip()
        for name in FIELD["image_url"].names
        for value in values.get(name, ())
        for part in value.split(",")
        if part.strip()
    ]
    for url in urls:
        _check_image_url(url)
    if len(urls) > model.max_images:
        raise InvalidRequest(
            f"{len(urls)} images were given, but {model.name} takes at most {model.max_images}; please send fewer."
        )
    return tuple(urls)


def _check_image_url(url: str) -> None:
    parts = _split(url)
    if any(c.isspace() for c in url):
        raise InvalidRequest(
            f"image_url {_quote(url)} has a space in it, and a web address has none; "
            "write each space as %20, or copy the address again from the browser."
        )
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(
            f"image_url {_quote(url)} is not a web address; use a link that starts with http:// or https://."
        )


def _split(url: str) -> SplitResult | None:
    """The parts of an address, or None when it cannot be read as one (an unclosed [ of an IPv6 host, say)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _aspect_ratio(values: Values, model: Model) -> str | None:
    ratio = (_first(values, "aspect_ratio") or "").strip().lower()
    if not ratio:
        return None
    if ratio not in model.aspect_ratios:
        raise InvalidRequest(
            f"aspect_ratio {_quote(ratio)} does not work with {model.name}; use one of {' '.join(model.aspect_ratios)}."
        )
    return ratio


def _resolution(values: Values, model: Model) -> str | None:
    resolution = (_first(values, "resolution") or "").strip().upper()
    if not resolution:
        return None
    if not model.takes_resolution:
        raise InvalidRequest(
            f"resolution works only with {_either(f'model={name}' for name in RESOLUTION_MODELS)}; "
            "leave it out or choose one of those."
        )
    if resolution not in RESOLUTIONS:
        raise InvalidRequest(f"resolution must be {_either(RESOLUTIONS)}.")
    return resolution


def _num_images(values: Values, model: Model) -> int:
    raw = (_first(values, "num_images") or str(DEFAULT_NUM_IMAGES)).strip()
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_NUM_IMAGES:
        raise InvalidRequest(f"num_images must be a whole number from 1 to {MAX_NUM_IMAGES}.")
    if count > 1 and not model.takes_num_images:
        raise InvalidRequest(
            f"num_images above 1 works only with {_either(f'model={name}' for name in NUM_IMAGES_MODELS)}; "
            "leave it out for this model."
        )
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
    url = (_first(values, *FIELD["callback_url"].names) or "").strip()
    if not url:
        return None
    parts = _split(url)
    scheme = parts.scheme.lower() if parts is not None else ""
    if len(url) > MAX_CALLBACK_URL or any(c.isspace() for c in url) or scheme not in ("http", "https"):
        raise InvalidRequest(
            f"callback_url {_quote(url)} is not a web address; use one that starts with https:// (or http://), "
            f"at most {MAX_CALLBACK_URL} characters."
        )
    return url


def _idempotency_key(values: Values, header: str | None) -> str | None:
    """The Idempotency-Key header, else the idempotency_key parameter; 1 to MAX_IDEMPOTENCY_KEY characters."""
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
