"""The service as its users meet it: the official `openai` client, unchanged, against a live
`feathertune serve` on loopback — upload, fine-tune, follow the job, chat with the result."""

from __future__ import annotations

import csv
import io

import pytest
from live import FAST_OPTIONS, wait_status, workspace_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with workspace_server(tmp_path_factory.mktemp("client")) as live:
        yield live


@pytest.fixture(scope="module")
def finished_job(server):
    client = server.client()
    train = client.files.create(file=(server.root / "train.jsonl").open("rb"), purpose="fine-tune")
    validation = client.files.create(file=(server.root / "validation.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=validation.id, suffix="e2e", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}},
        metadata={"purpose": "test"}, extra_body={"feathertune": FAST_OPTIONS})
    assert job.object == "fine_tuning.job"
    assert job.status in ("validating_files", "queued", "running")  # the worker may be quick to take it
    return client, train, wait_status(client, job.id, {"succeeded", "failed", "cancelled"})


def test_a_job_runs_to_a_fine_tuned_model(server, finished_job):
    client, train, job = finished_job
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:e2e:{job.id}"
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 8
    assert job.hyperparameters.learning_rate_multiplier == 1.0  # "auto" resolved, as OpenAI reports it
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.seed == 7
    assert job.metadata == {"purpose": "test"}
    assert [j.id for j in client.fine_tuning.jobs.list(limit=5)] == [job.id]
    # The uploaded file, listed and returned byte for byte.
    assert client.files.retrieve(train.id).bytes == len((server.root / "train.jsonl").read_bytes())
    assert client.files.content(train.id).read() == (server.root / "train.jsonl").read_bytes()
    assert train.id in [f.id for f in client.files.list(purpose="fine-tune")]


def test_events_stream_the_metrics_in_order(finished_job):
    client, _, job = finished_job
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"  # newest first, as OpenAI lists them
    assert messages[-1].startswith("Created fine-tuning job") and "Files validated, moving job to queued state" in messages
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 13))  # 48 examples / 8 × 2 epochs
    assert all(m["train_loss"] > 0 for m in metrics)
    assert [m["step"] for m in metrics if m.get("valid_loss") is not None] == [6, 12]  # one per epoch
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    after = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert [e.id for e in after.data] == [e.id for e in events[3:6]]


def test_each_checkpoint_is_a_model_with_its_metrics(finished_job):
    client, _, job = finished_job
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [12, 6]
    for checkpoint in checkpoints:
        assert checkpoint.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
        assert checkpoint.metrics.train_loss > 0 and checkpoint.metrics.valid_loss > 0
    models = {m.id for m in client.models.list()}
    assert {"tiny", job.fine_tuned_model, *(c.fine_tuned_model_checkpoint for c in checkpoints)} <= models
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "user"
    reply = client.chat.completions.create(model=checkpoints[-1].fine_tuned_model_checkpoint,
                                           messages=[{"role": "user", "content": "name[Aromi]"}], max_tokens=4)
    assert reply.choices[0].message.role == "assistant"


def test_the_result_file_is_openais_step_metrics_csv(finished_job):
    client, _, job = finished_job
    (result,) = job.result_files
    assert client.files.retrieve(result).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(client.files.content(result).text)))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == list(range(1, 13)) and float(rows[-1]["valid_loss"]) > 0


def test_chat_with_the_fine_tuned_model_plain_and_streaming(finished_job):
    client, _, job = finished_job
    messages = [{"role": "user", "content": "name[The Eagle], food[French]"}]
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=12,
                                           temperature=0)
    assert reply.object == "chat.completion" and reply.model == job.fine_tuned_model
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stream = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer, however it is delivered
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    base = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert base.model == "tiny"
