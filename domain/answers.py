"""What the service says about a task: the status and JSON body of GET /nanobanana/tasks/<task_id>.

The same body answers the HTTP request and rides in the task's webhook, so it lives here, below both.
"""

from __future__ import annotations

import time

from stores.records import DeliveryState, TaskRecord, TaskState

FAILED_STATES = (TaskState.FAILED, TaskState.UNCONFIRMED)


def task_answer(record: TaskRecord, elapsed: float, status_url: str | None = None) -> tuple[int, dict]:
    """200 with its pictures, 202 while pending, 502 when it failed; and the JSON body."""
    if record.state == TaskState.SUCCESS:
        status, body = 200, _success(record, elapsed)
    elif record.state in FAILED_STATES:
        status, body = 502, _failure(record)
    else:
        status, body = 202, _pending(record, status_url)
    if record.deliver_to:
        body["webhook"] = {"state": record.webhook_state or DeliveryState.PENDING, "attempts": record.webhook_attempts}
    return status, body


def ended_task_body(record: TaskRecord) -> dict:
    """The body GET /nanobanana/tasks/<task_id> answers for a task that has ended (a webhook's `data`)."""
    return task_answer(record, (record.completed_at or time.time()) - record.created_at)[1]


def _success(record: TaskRecord, elapsed: float) -> dict:
    return {
        "status": "success",
        "task_id": record.task_id,
        "upstream_task_id": record.upstream_task_id,
        "mode": record.mode,
        "image_url": record.image_urls[0],
        "image_urls": list(record.image_urls),
        "upstream_image_url": (record.upstream_image_urls or record.image_urls)[0],
        "source_image_urls": list(record.source_image_urls),
        "used_previous_image": record.used_previous_image,
        "user_id": record.user_id,
        "elapsed_seconds": round(elapsed, 2),
    }


def _failure(record: TaskRecord) -> dict:
    return {
        "status": "failed",
        "task_id": record.task_id,
        "upstream_task_id": record.upstream_task_id,
        "error": {
            "code": record.error_code or "generation_failed",
            "message": record.error_message or "The image could not be made.",
        },
    }


def _pending(record: TaskRecord, status_url: str | None) -> dict:
    return {
        "status": "pending",
        "task_id": record.task_id,
        "upstream_task_id": record.upstream_task_id,
        "status_url": status_url,
        "message": f"Your picture is still being made. It will be ready at {status_url} in a few seconds.",
    }
