"""What the service says about a task: the status and JSON body of GET /nanobanana/tasks/<task_id>.

The same body answers the HTTP request and rides in the task's webhook, so it lives here, below both.
"""

from __future__ import annotations

import time

from stores.records import DeliveryState, TaskRecord, TaskState

FAILED_STATES = (TaskState.FAILED, TaskState.UNCONFIRMED)


def task_answer(
    record: TaskRecord, elapsed: float, status_url: str | None = None, queue_position: int | None = None
) -> tuple[int, dict]:
    """200 with its pictures, 202 while queued or pending, 502 when it failed, 410 when cancelled; and the JSON
    body. A queued task says where it stands in line."""
    if record.state == TaskState.SUCCESS:
        status, body = 200, _success(record, elapsed)
    elif record.state in FAILED_STATES:
        status, body = 502, _failure(record)
    elif record.state == TaskState.CANCELLED:
        status, body = 410, _failure(record, "cancelled")
    else:
        status, body = 202, _pending(record, status_url, queue_position)
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


def _failure(record: TaskRecord, status: str = "failed") -> dict:
    return {
        "status": status,
        "task_id": record.task_id,
        "upstream_task_id": record.upstream_task_id,
        "error": {
            "code": record.error_code or "generation_failed",
            "message": record.error_message or "The image could not be made.",
        },
    }


def _pending(record: TaskRecord, status_url: str | None, queue_position: int | None) -> dict:
    if record.state == TaskState.QUEUED:
        where = f"It is {ordinal(queue_position)} in line" if queue_position else "It is waiting its turn"
        message = f"{where} for the image service; it will be ready at {status_url}."
    else:
        message = f"Your picture is still being made. It will be ready at {status_url} in a few seconds."
    return {
        "status": "pending",
        "task_id": record.task_id,
        "upstream_task_id": record.upstream_task_id,
        "queue_position": queue_position if record.state == TaskState.QUEUED else None,
        "status_url": status_url,
        "message": message,
    }


def ordinal(number: int) -> str:
    """1st, 2nd, 3rd, 4th, …, 11th, 12th, 13th, …, 21st."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"
