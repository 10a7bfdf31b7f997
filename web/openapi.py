"""The OpenAPI 3 document of the service, served at /openapi.json.

The generation parameters are built from the table the parser reads (`domain.params.FIELDS`), and the
limits quoted in descriptions from config, so the document and the checks cannot drift apart.
The tests validate it, and schemathesis checks the live service against it.
"""

from __future__ import annotations

from config import BODY_TIMEOUT, MAX_BODY_BYTES, REQUEST_LINE_LIMIT, UPLOAD_BODY_TIMEOUT, UPLOAD_PATH, size_in_words
from domain.media import UPLOAD_TYPES
from domain.params import FIELDS, MAX_USER_ID, Field, Kind
from stores.records import DeliveryState
from web.errors import error_codes

JSON = "application/json"
TEXT = "text/plain"


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def error_response(description: str, headers: dict | None = None) -> dict:
    response = {
        "description": description,
        "content": {JSON: {"schema": ref("Error")}, TEXT: {"schema": {"type": "string"}}},
    }
    if headers:
        response["headers"] = headers
    return response


def json_response(description: str, schema: dict, headers: dict | None = None) -> dict:
    response = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


STRING = {"type": "string"}


def chat_route(
    summary: str, operation_id: str, headers: list[str], media_type: str, fields: dict, answered: str, answer: dict
) -> dict:
    """A chat platform's POST: its own secret or signature in `headers` (no access token), its message, at once."""
    return {
        "post": {
            "summary": summary,
            "operationId": operation_id,
            "parameters": [{"name": name, "in": "header", "required": True, "schema": STRING} for name in headers],
            "requestBody": {
                "required": True,
                "content": {media_type: {"schema": {"type": "object", "required": list(fields), "properties": fields}}},
            },
            "security": [],
            "responses": {
                "200": json_response(answered, answer),
                **{code: COMMON_ERRORS[code] for code in ("400", "401", "404", "413")},
            },
        }
    }


UPSTREAM_TASK_ID = {"type": ["string", "null"], "description": "The upstream's id for the task, once known"}
WEBHOOK = {
    "type": "object",
    "description": "With a callback_url: how its webhook is doing",
    "required": ["state", "attempts"],
    "properties": {
        "state": {"enum": list(DeliveryState)},
        "attempts": {"type": "integer", "minimum": 0},
    },
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": STRING}}
LOCATION = {"Location": {"description": "Where the answer is", "schema": STRING}}

COMMON_ERRORS = {
    "400": error_response("A parameter is missing or wrong; the message says how to fix it"),
    "401": error_response(
        "Access tokens are on and none or a wrong one was given",
        {"WWW-Authenticate": {"description": "Bearer", "schema": STRING}},
    ),
    "404": error_response("Unknown path or task"),
    "405": error_response("Wrong method", {"Allow": {"description": "The methods allowed", "schema": STRING}}),
    "408": error_response(f"The request body did not arrive within {BODY_TIMEOUT:g} seconds"),
    "413": error_response(f"Request body over {size_in_words(MAX_BODY_BYTES)}"),
    "414": error_response(f"The request line is over {size_in_words(REQUEST_LINE_LIMIT)}: send long prompts in a POST"),
    "431": error_response("A request header is too large"),
    "500": error_response("A bug on our side"),
    "503": error_response("No API key, the upstream or the store is unavailable", RETRY_AFTER),
}

TASK_RESPONSES = {
    "200": {
        "description": "The picture is ready (format=text: its URLs, one per line)",
        "content": {JSON: {"schema": ref("Success")}, TEXT: {"schema": STRING}},
    },
    "202": {
        "description": "Still being made: ask again at status_url (the Location header)",
        "headers": LOCATION,
        "content": {JSON: {"schema": ref("Pending")}, TEXT: {"schema": STRING}},
    },
    "302": {"description": "format=redirect: the picture", "headers": LOCATION},
    "410": {
        "description": "The task was cancelled before it was submitted",
        "content": {JSON: {"schema": ref("Cancelled")}, TEXT: {"schema": STRING}},
    },
    "502": {
        "description": "The generation failed, or the upstream answered something unusable",
        "content": {JSON: {"schema": {"oneOf": [ref("Failed"), ref("Error")]}}, TEXT: {"schema": STRING}},
    },
    **{code: response for code, response in COMMON_ERRORS.items() if code != "405"},
}

KIND_SCHEMAS = {
    Kind.TEXT: {"type": "string"},
    Kind.URL: {"type": "string", "format": "uri"},
    Kind.URL_LIST: {"type": "array", "items": {"type": "string", "format": "uri"}},
    Kind.WHOLE_NUMBER: {"type": "integer"},
    Kind.NUMBER: {"type": "number"},
    Kind.FLAG: {"type": ["boolean", "string"]},  # a JSON body may send true or false; a query or a form, the words
}


def field_schema(field: Field) -> dict:
    """A generation parameter's schema: its kind's type, with the limits and choices the parser applies."""
    enum = [True, False, *field.enum] if field.kind is Kind.FLAG else list(field.enum)
    limits = {
        "enum": enum,
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "maxItems": field.max_items,
        "minimum": field.minimum,
        "maximum": field.maximum,
        "default": field.default,
    }
    stated = {keyword: value for keyword, value in limits.items() if value is not None and value != []}
    aliases = {"x-aliases": list(field.aliases)} if field.aliases else {}
    return {**KIND_SCHEMAS[field.kind], **stated, "description": description(field), **aliases}


def description(field: Field) -> str:
    if not field.aliases:
        return field.help
    return f"{field.help}; {'alias' if len(field.aliases) == 1 else 'aliases'} {', '.join(field.aliases)}"


GENERATION_FIELDS = {field.name: field_schema(field) for field in FIELDS}
PREFER_HEADER = {
    "name": "Prefer",
    "in": "header",
    "schema": STRING,
    "description": "RFC 7240: respond-async (wait=0) or wait=N (an explicit wait parameter wins)",
}
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "schema": GENERATION_FIELDS["idempotency_key"],
    "description": "The same as the idempotency_key parameter",
}
PREFERENCE_APPLIED = {
    "Preference-Applied": {"description": "The Prefer wish that was followed (RFC 7240)", "schema": STRING}
}
GENERATION_RESPONSES = {
    **TASK_RESPONSES,
    **{
        code: {**TASK_RESPONSES[code], "headers": {**TASK_RESPONSES[code].get("headers", {}), **PREFERENCE_APPLIED}}
        for code in ("200", "202", "502")
    },
    "422": error_response("This idempotency key was used for a different request"),
    "429": error_response("Over RATE_LIMIT", RETRY_AFTER),
}


def generation_parameters() -> list[dict]:
    parameters = []
    for name, schema in GENERATION_FIELDS.items():
        parameter = {"name": name, "in": "query", "required": name == "prompt", "schema": schema}
        if schema.get("type") == "array":
            parameter.update(style="form", explode=True)
        parameters.append(parameter)
    return [*parameters, IDEMPOTENCY_HEADER, PREFER_HEADER]


def format_parameter() -> dict:
    return {"name": "format", "in": "query", "schema": GENERATION_FIELDS["format"]}


UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["url", "content_type", "bytes"],
    "properties": {
        "url": {"type": "string", "format": "uri", "description": "Give it as image_url to start from this picture"},
        "content_type": {"enum": list(UPLOAD_TYPES), "description": "Known from the bytes, not the name"},
        "bytes": {"type": "integer", "minimum": 1},
    },
}
PICTURE = {"type": "string", "format": "binary"}


def upload_operation(guarded: list) -> dict:
    """POST /nanobanana/uploads: a picture from the device, as a form's `file` or as the whole body."""
    return {
        "summary": "Keep a picture from your device (PNG, JPEG, WebP or GIF), to start from it as image_url",
        "description": (
            "Up to UPLOAD_MAX_BYTES (10 MB unless set). Kept in the media store (the local folder without MEDIA_STORE, "
            "which needs PUBLIC_BASE_URL so the image service can fetch it) for HISTORY_TTL after its last use. "
            "Counts against RATE_LIMIT."
        ),
        "operationId": "upload",
        "parameters": [{"name": "user_id", "in": "query", "schema": GENERATION_FIELDS["user_id"]}],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": {"file": PICTURE}}
                },
                **{kind: {"schema": PICTURE} for kind in UPLOAD_TYPES},
            },
        },
        "security": guarded,
        "responses": {
            "201": json_response("Kept: its address", UPLOAD_SCHEMA, LOCATION),
            "400": COMMON_ERRORS["400"],
            "401": COMMON_ERRORS["401"],
            "408": error_response(f"The picture did not arrive within {UPLOAD_BODY_TIMEOUT:g} seconds"),
            "413": error_response("The picture is over UPLOAD_MAX_BYTES"),
            "415": error_response("Not a PNG, JPEG, WebP or GIF (by its bytes), or not sent as a picture"),
            "429": error_response("Over RATE_LIMIT", RETRY_AFTER),
            "500": COMMON_ERRORS["500"],
            "503": error_response(
                "Uploads cannot work here yet (the message names the setting: PUBLIC_BASE_URL or MEDIA_STORE), "
                "or the store is unavailable",
                RETRY_AFTER,
            ),
        },
    }


USER_ID_PATH = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID},
}

SCHEMAS = {
    "Success": {
        "type": "object",
        "required": [
            "status",
            "task_id",
            "mode",
            "image_url",
            "image_urls",
            "source_image_urls",
            "used_previous_image",
        ],
        "properties": {
            "status": {"const": "success"},
            "task_id": STRING,
            "upstream_task_id": UPSTREAM_TASK_ID,
            "webhook": WEBHOOK,
            "mode": {"enum": ["text-to-image", "image-to-image"]},
            "image_url": STRING,
            "image_urls": {"type": "array", "items": STRING, "minItems": 1},
            "upstream_image_url": {
                "type": "string",
                "description": "The upstream's own address (image_url may be a copy)",
            },
            "source_image_urls": {"type": "array", "items": STRING},
            "used_previous_image": {"type": "boolean"},
            "user_id": {"type": ["string", "null"]},
            "elapsed_seconds": {"type": "number"},
        },
    },
    "Pending": {
        "type": "object",
        "required": ["status", "task_id", "status_url", "message"],
        "properties": {
            "status": {"const": "pending"},
            "task_id": STRING,
            "upstream_task_id": UPSTREAM_TASK_ID,
            "queue_position": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "While it waits for its turn at the image service: 1 goes next; null once submitted",
            },
            "webhook": WEBHOOK,
            "status_url": STRING,
            "message": STRING,
        },
    },
    "Cancelled": {
        "type": "object",
        "required": ["status", "task_id"],
        "properties": {
            "status": {"const": "cancelled"},
            "task_id": STRING,
            "upstream_task_id": {"type": "null"},
            "webhook": WEBHOOK,
            "error": {
                "type": "object",
                "properties": {"code": {"const": "cancelled"}, "message": STRING},
            },
        },
    },
    "Failed": {
        "type": "object",
        "required": ["status", "task_id", "error"],
        "properties": {
            "status": {"const": "failed"},
            "task_id": STRING,
            "upstream_task_id": UPSTREAM_TASK_ID,
            "webhook": WEBHOOK,
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "enum": ["generation_failed", "upstream_error", "upstream_unavailable", "invalid_request"]
                    },
                    "message": STRING,
                },
            },
        },
    },
    "Error": {
        "type": "object",
        "required": ["status", "error"],
        "properties": {
            "status": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"enum": error_codes()},
                    "message": STRING,
                },
            },
        },
    },
    "History": {
        "type": "object",
        "required": ["user_id", "last_image_url", "updated_at", "chain"],
        "properties": {
            "user_id": STRING,
            "last_image_url": {"type": ["string", "null"]},
            "updated_at": {"type": ["string", "null"], "format": "date-time"},
            "chain": {
                "type": "array",
                "description": "The user's pictures, oldest first, the last one remembered",
                "items": {
                    "type": "object",
                    "required": ["task_id", "image_url", "prompt", "created_at"],
                    "properties": {
                        "task_id": STRING,
                        "image_url": STRING,
                        "prompt": {"type": ["string", "null"]},
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
            },
        },
    },
    "Cleared": {
        "type": "object",
        "required": ["user_id", "cleared"],
        "properties": {"user_id": STRING, "cleared": {"const": True}},
    },
    "Credits": {
        "type": "object",
        "required": ["keys"],
        "properties": {
            "keys": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key", "credits", "usable"],
                    "properties": {
                        "key": {"type": "integer", "minimum": 1},
                        "credits": {"type": ["number", "null"]},
                        "usable": {"type": "boolean"},
                    },
                },
            }
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "configured", "api_keys", "store", "store_ok", "demo"],
        "properties": {
            "status": {"enum": ["ok", "degraded"]},
            "configured": {"type": "boolean"},
            "api_keys": {"type": "integer", "minimum": 0},
            "store": {"enum": ["sqlite", "redis"]},
            "store_ok": {"type": "boolean"},
            "demo": {
                "type": "boolean",
                "description": "Demo mode: `make run` started the bundled emulator because no key was configured",
            },
        },
    },
    "Callback": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "code": {"type": "integer"},
            "msg": STRING,
            "data": {"type": "object", "required": ["taskId"], "properties": {"taskId": STRING}},
        },
    },
}


def document(server_url: str, tokens_required: bool) -> dict:
    """The OpenAPI document; with access tokens on, the guarded routes say so."""
    guarded = [{"bearer": []}] if tokens_required else []
    generation_body = {
        "content": {
            JSON: {"schema": {"type": "object", "required": ["prompt"], "properties": GENERATION_FIELDS}},
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "required": ["prompt"], "properties": GENERATION_FIELDS}
            },
        }
    }
    paths = {
        "/": {
            "get": {
                "summary": "A small web page to try the service",
                "operationId": "home",
                "security": [],
                "responses": {"200": {"description": "The page", "content": {"text/html": {"schema": STRING}}}},
            }
        },
        "/nanobanana": {
            "get": {
                "summary": "Make or edit a picture and answer with its URL",
                "operationId": "generate",
                "parameters": generation_parameters(),
                "security": guarded,
                "responses": GENERATION_RESPONSES,
            },
            "post": {
                "summary": "The same, with the fields in a form or JSON body",
                "operationId": "generatePost",
                "parameters": [IDEMPOTENCY_HEADER, PREFER_HEADER],
                "requestBody": generation_body,
                "security": guarded,
                "responses": GENERATION_RESPONSES,
            },
        },
        UPLOAD_PATH: {"post": upload_operation(guarded)},
        "/nanobanana/tasks/{task_id}": {
            "get": {
                "summary": "A task made through this service, by its task_id or its upstream_task_id",
                "operationId": "task",
                "parameters": [
                    {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}},
                    format_parameter(),
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": {"type": "number", "minimum": 0},
                        "description": "A long poll: seconds to wait for the task to end (clamped to the polling "
                        "window); without it the answer comes at once",
                    },
                ],
                "security": guarded,
                "responses": TASK_RESPONSES,
            },
            "delete": {
                "summary": "Cancel a task still waiting in the queue: it is never submitted, nothing is paid",
                "operationId": "cancelTask",
                "parameters": [
                    {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                ],
                "security": guarded,
                "responses": {
                    "200": json_response("Cancelled", ref("Cancelled")),
                    "409": error_response("Already submitted: it can no longer be cancelled"),
                    **COMMON_ERRORS,
                },
            },
        },
        "/nanobanana/history/{user_id}": {
            "get": {
                "summary": "A user's remembered picture",
                "operationId": "history",
                "parameters": [USER_ID_PATH],
                "security": guarded,
                "responses": {
                    "200": json_response("The remembered picture, or nulls", ref("History")),
                    **COMMON_ERRORS,
                },
            },
            "delete": {
                "summary": "Forget a user's picture (idempotent)",
                "operationId": "forget",
                "parameters": [USER_ID_PATH],
                "security": guarded,
                "responses": {"200": json_response("Forgotten", ref("Cleared")), **COMMON_ERRORS},
            },
        },
        "/nanobanana/history/{user_id}/undo": {
            "post": {
                "summary": "Step back: the picture before the last is remembered again",
                "operationId": "undo",
                "parameters": [USER_ID_PATH],
                "security": guarded,
                "responses": {
                    "200": json_response("The chain, one picture shorter", ref("History")),
                    "409": error_response("There is nothing to undo"),
                    **COMMON_ERRORS,
                },
            }
        },
        "/telegram/webhook": chat_route(
            "For Telegram: an update for the bot (with TELEGRAM_BOT_TOKEN)",
            "telegramWebhook",
            ["X-Telegram-Bot-Api-Secret-Token"],
            JSON,
            {"update_id": {"type": "integer"}},
            "Received; handled in the background",
            {"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"]},
        ),
        "/discord/interactions": chat_route(
            "For Discord: an interaction, signed (with DISCORD_APPLICATION_ID and DISCORD_PUBLIC_KEY)",
            "discordInteractions",
            ["X-Signature-Ed25519", "X-Signature-Timestamp"],
            JSON,
            {"type": {"type": "integer"}},
            "Discord's answer: a pong, a deferred answer, or a message",
            {"type": "object", "properties": {"type": {"type": "integer"}}, "required": ["type"]},
        ),
        "/slack/commands": chat_route(
            "For Slack: a slash command, signed (with SLACK_SIGNING_SECRET)",
            "slackCommands",
            ["X-Slack-Signature", "X-Slack-Request-Timestamp"],
            "application/x-www-form-urlencoded",
            {name: STRING for name in ("team_id", "user_id", "text", "response_url")},
            "Slack's answer: a note for the person, or a picture for the channel",
            {"type": "object", "properties": {"response_type": STRING, "text": STRING}},
        ),
        "/media/{name}": {
            "get": {
                "summary": "A lasting copy of a picture (MEDIA_STORE=local)",
                "operationId": "media",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": STRING}],
                "security": [],
                "responses": {
                    "200": {"description": "The picture", "content": {"image/*": {"schema": STRING}}},
                    "404": COMMON_ERRORS["404"],
                },
            }
        },
        "/nanobanana/credits": {
            "get": {
                "summary": "Remaining upstream credits of each key, by its number",
                "operationId": "credits",
                "security": guarded,
                "responses": {"200": json_response("Credits by key number", ref("Credits")), **COMMON_ERRORS},
            }
        },
        "/nanobanana/callback": {
            "post": {
                "summary": "For the upstream: a task has ended",
                "operationId": "callback",
                "parameters": [
                    {"name": "task", "in": "query", "schema": STRING},
                    {"name": "secret", "in": "query", "schema": STRING},
                ],
                "requestBody": {"required": True, "content": {JSON: {"schema": ref("Callback")}}},
                "security": [],
                "responses": {
                    "200": json_response(
                        "Received (ignored unless genuine)",
                        {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]},
                    ),
                    **{code: COMMON_ERRORS[code] for code in ("400", "413", "500", "503")},
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness and configuration, never a secret",
                "operationId": "health",
                "security": [],
                "responses": {
                    "200": json_response("Healthy", ref("Health")),
                    "503": json_response("Degraded: the store cannot be reached", ref("Health")),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "security": guarded,
                "responses": {
                    "200": {"description": "Prometheus text format", "content": {TEXT: {"schema": STRING}}},
                    "401": COMMON_ERRORS["401"],
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {"200": json_response("OpenAPI 3.1", {"type": "object"})},
            }
        },
    }
    spec = {
        "openapi": "3.1.0",
        "info": {
            "title": "Nano Banana API wrapper",
            "version": "1.0.0",
            "description": "One HTTP GET in front of the NanoBanana image API, with per-user picture memory.",
        },
        "servers": [{"url": server_url.rstrip("/")}],
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if tokens_required:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return spec
