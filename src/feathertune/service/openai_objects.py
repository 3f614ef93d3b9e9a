"""The shapes of OpenAI's objects, built from the store's rows: the same field names, the same
status values, so that the official `openai` client parses them into its own types unchanged.

Reference: the client's types (openai/types/file_object.py, fine_tuning/fine_tuning_job.py,
fine_tuning_job_event.py, jobs/fine_tuning_job_checkpoint.py, model.py, chat/chat_completion*.py).
"""

from __future__ import annotations

import re
from typing import Any

OWNER = "feathertune"  # `owned_by` / `organization_id`: one local organisation


class ApiError(Exception):
    """An error the API answers with `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
             413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_found(kind: str, object_id: str, param: str) -> ApiError:
    code = re.sub(r"[^a-z]+", "_", kind.lower()) + "_not_found"  # "fine-tuning job" → fine_tuning_job_not_found
    return ApiError(404, f"No such {kind}: {object_id!r}", param=param, code=code)


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if data:
        body["first_id"], body["last_id"] = data[0]["id"], data[-1]["id"]
    return body


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    method = row["method"]
    hyper = method.get(method["type"], {}).get("hyperparameters", {})
    return {
        "object": "fine_tuning.job", "id": row["id"], "created_at": row["created_at"],
        "error": row["error"], "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
        "hyperparameters": {k: hyper.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "model": row["model"], "organization_id": OWNER, "result_files": row["result_files"], "seed": row["seed"],
        "status": row["status"], "trained_tokens": row["trained_tokens"], "training_file": row["training_file"],
        "validation_file": row["validation_file"], "estimated_finish": row["estimated_finish"],
        "integrations": [], "metadata": row["metadata"], "method": method, "user_provided_suffix": row["suffix"],
        "feathertune": row["options"],
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "data": row["data"], "type": row["type"]}


def checkpoint_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.checkpoint", "id": row["id"], "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": row["fine_tuned_model_checkpoint"], "fine_tuning_job_id": row["job_id"],
            "metrics": row["metrics"], "step_number": row["step_number"]}


def model_object(model_id: str, created: int, owned_by: str = OWNER) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
