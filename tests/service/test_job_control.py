"""Nothing lost: cancel, pause and resume a running job; SIGKILL the server mid-job and start it
again — the job finishes from its last checkpoint and every upload is still there."""

from __future__ import annotations

import json
import os
import time

import pytest
from live import FAST_OPTIONS, LiveServer, wait_for, wait_status
from runs import make_workspace

pytest.importorskip("openai")

# Long enough to act on while it runs (the tiny model takes ~30 steps a second), checkpoints often.
LONG = {**FAST_OPTIONS, "train": {**FAST_OPTIONS["train"], "max_steps": 3000, "checkpoint_every": 20}}


@pytest.fixture
def workspace(tmp_path):
    root, _ = make_workspace(tmp_path)
    return root


def start_job(client, root, options=LONG):
    train = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, extra_body={"feathertune": options})
    return train, job


def metric_steps(client, job_id):
    return [e.data["step"] for e in client.fine_tuning.jobs.list_events(job_id, limit=10000) if e.type == "metrics"]


def runner_processes(job_id: str) -> list[int]:
    """Pids of training processes for this job still alive (from /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            status = open(f"/proc/{pid}/stat").read().split(") ", 1)[1]
        except OSError:
            continue
        if b"feathertune.service.runner" in command and any(job_id.encode() in part for part in command) \
                and not status.startswith("Z"):
            found.append(int(pid))
    return found


def test_pause_resume_and_cancel_a_running_job(workspace):
    server = LiveServer(workspace / "data", {"tiny": workspace / "model"}).start()
    try:
        client = server.client()
        _, job = start_job(client, workspace)
        wait_for(lambda: len(metric_steps(client, job.id)) >= 5, what="training steps")

        started = time.perf_counter()
        paused = client.fine_tuning.jobs.pause(job.id)
        assert paused.status == "paused" and time.perf_counter() - started < 5
        assert not runner_processes(job.id)
        run = workspace / "data" / "jobs" / job.id / "run"
        stopped_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
        assert stopped_at > 0 and client.fine_tuning.jobs.retrieve(job.id).status == "paused"

        resumed = client.fine_tuning.jobs.resume(job.id)
        assert resumed.status in ("queued", "running")
        wait_for(lambda: max(metric_steps(client, job.id)) > stopped_at + 5, what="training after the resume")
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=10000)]
        assert f"Resuming from the checkpoint at step {stopped_at}" in messages
        steps = metric_steps(client, job.id)[::-1]
        assert steps == list(range(1, len(steps) + 1))  # no step twice, none skipped across the pause

        started = time.perf_counter()
        cancelled = client.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled" and time.perf_counter() - started < 5
        assert cancelled.finished_at is not None and cancelled.fine_tuned_model is None
        assert not runner_processes(job.id)
        with pytest.raises(Exception) as info:
            client.fine_tuning.jobs.resume(job.id)
        assert getattr(info.value, "status_code", None) == 400
    finally:
        server.stop()


def test_a_killed_server_resumes_its_job_and_keeps_its_files(workspace):
    options = {**LONG, "train": {**LONG["train"], "max_steps": 400}}
    server = LiveServer(workspace / "data", {"tiny": workspace / "model"}).start()
    client = server.client()
    train, job = start_job(client, workspace, options)
    extra = client.files.create(file=(workspace / "validation.jsonl").open("rb"), purpose="fine-tune")
    wait_for(lambda: list(client.fine_tuning.jobs.checkpoints.list(job.id)), what="a first checkpoint")
    server.kill()
    assert wait_for(lambda: not runner_processes(job.id), 10, what="the training process to die with the server")
    run = workspace / "data" / "jobs" / job.id / "run"
    kept = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))

    server.start()
    try:
        client = server.client()
        done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"})
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=10000)]
        assert f"Resuming from the checkpoint at step {kept}" in messages
        assert messages.count("Fine-tuning job started") == 1  # resumed, not started again
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps == list(range(1, 401))  # the log continues from the checkpoint: no step twice
        for uploaded, path in ((train, workspace / "train.jsonl"), (extra, workspace / "validation.jsonl")):
            assert client.files.content(uploaded.id).read() == path.read_bytes()
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                               messages=[{"role": "user", "content": "name[Aromi]"}])
        assert reply.choices[0].message.content is not None
    finally:
        server.stop()
