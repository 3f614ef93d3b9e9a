"""The worker: takes jobs from the store and runs each in its own training process.

    claim ─► validating_files: read every example (the CLI's validator) ─► queued | failed
    claim ─► running: write config.yaml, start `python -m feathertune.service.runner`, then each poll:
                heartbeat · cancel/pause asked? → SIGTERM (the run checkpoints and exits)
                metrics.jsonl → `metrics` events, trained_tokens, estimated_finish
                a new checkpoint → its adapter kept, a checkpoint row and a model to chat with
             ─► succeeded (adapter → fine-tuned model, step_metrics.csv) | paused | cancelled | failed

A worker runs `slots` jobs at once (threads; on a CUDA machine slot i gets GPU i). A job whose
worker died (a killed server, a killed `serve --worker`) is claimed again and resumes from its
newest checkpoint: the run directory is the job's, under the shared data directory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from feathertune.errors import FeathertuneError
from feathertune.files import atomic_directory, write_atomic
from feathertune.service import jobs
from feathertune.service.paths import DataDir, new_id
from feathertune.service.runner import STOPPED, SUCCEEDED, die_with_parent
from feathertune.service.store import Store, worker_name

STOP_GRACE_S = 60  # a stopping run finishes its step and writes a checkpoint; then it is killed
# A DPO run's figures beside OpenAI's in a checkpoint's metrics and in step_metrics.csv (each event has all of them)
PREFERENCE_COLUMNS = ["reward_accuracy", "reward_margin"]


class Worker:
    def __init__(self, store: Store, data: DataDir, models: dict[str, str], *, slots: int = 1,
                 lease_s: float = 30.0, poll_s: float = 0.5, gpus: int = 0):
        self.store, self.data, self.models = store, data, models
        self.slots, self.lease_s, self.poll_s, self.gpus = slots, lease_s, poll_s, gpus
        self.name = worker_name()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for slot in range(self.slots):
            thread = threading.Thread(target=self._serve, args=(slot,), name=f"feathertune-worker-{slot}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """Stop taking jobs; running ones checkpoint and go back to the queue."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)

    def _serve(self, slot: int) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim_job(self.name, self.lease_s)
            except Exception as exc:  # noqa: BLE001  (a database hiccup: say so, try again)
                print(f"[worker] claiming a job failed: {exc}", file=sys.stderr, flush=True)
                job = None
            if job is None:
                self._stopping.wait(self.poll_s)
                continue
            try:
                if job["status"] == "validating_files":
                    self._validate(job)
                else:
                    JobRun(self, job, slot).run()
            except Exception as exc:  # noqa: BLE001  (one job's failure must not stop the worker)
                self._fail(job, "internal_error", f"{type(exc).__name__}: {exc}")

    # -- validating_files -------------------------------------------------------------------
    def _validate(self, job: dict[str, Any]) -> None:
        method = None
        for param in ("training_file", "validation_file"):
            if not job[param]:
                continue
            self.event(job, f"Validating {param.replace('_', ' ')}: {job[param]}")
            try:
                examples = self.read_examples(job, param)
            except FeathertuneError as exc:
                self._fail(job, f"invalid_{param}", str(exc), param=param)
                return
            # The whole file is read: whether it holds preference pairs is known now, not told by a line.
            row = self.store.get("files", job[param]) or {"id": job[param], "filename": "deleted"}
            problem = jobs.file_kind_problem(job, param, row, examples.kind == "preference",
                                             f"it reads as {examples.kind} examples, format {examples.format}")
            if problem:
                self._fail(job, f"invalid_{param}", problem, param=param)
                return
            method = method or jobs.resolved_method(job, len(examples))  # sized by the training file
        self.event(job, "Files validated, moving job to queued state")
        self.store.update_job(job["id"], when_status=("validating_files",), when_worker=self.name,
                              status="queued", worker=None, method=method)

    def read_examples(self, job: dict[str, Any], param: str):
        """A job's file (data.Examples), validated by the CLI's reader; DataError names the file id and line."""
        from feathertune.data import read_examples
        from feathertune.errors import DataError

        row = self.store.get("files", job[param])
        if row is None:
            raise DataError([f"{job[param]}: the file was deleted"])
        path = self.data.file(row["stored_name"])
        data = job["options"].get("data") or {}  # read as the run will: the job's format and field names
        fields = {key: data[key] for key in ("text_field", "label_field") if key in data}
        try:
            return read_examples(path, data.get(jobs.DATA_FORMAT[param], "auto"), **fields)
        except DataError as exc:
            # Name the file by its id, as the client knows it, never by the server's path.
            problems = [p.replace(str(path), row["id"]) for p in exc.problems]
            raise DataError(problems, path=f"{row['id']} ({row['filename']})") from None

    # -- shared by JobRun ---------------------------------------------------------------------
    def event(self, job: dict[str, Any], message: str, *, level: str = "info", type: str = "message",
              data: dict | None = None) -> None:
        self.store.add_event(job["id"], message, level=level, type=type, data=data)

    def _fail(self, job: dict[str, Any], code: str, message: str, param: str | None = None) -> None:
        message = message.replace(str(self.data.root), "<data>")
        self.event(job, f"The job failed: {message}", level="error")  # before the status, as above
        self.store.update_job(job["id"], when_status=("validating_files", "queued", "running"),
                              when_worker=self.name, status="failed", worker=None, requested=None,
                              error={"code": code, "message": message, "param": param}, finished_at=int(time.time()))


class JobRun:
    """One job on one slot: its training process and what the worker makes of its output."""

    def __init__(self, worker: Worker, job: dict[str, Any], slot: int):
        self.worker, self.store, self.job, self.slot = worker, worker.store, job, slot
        self.dir = worker.data.job(job["id"])
        self.run_dir = self.dir / "run"
        self.metrics_seen = self._last_metrics_step()
        self.started, self.step_at_start = time.time(), None
        self.total_steps = 0

    def run(self) -> None:
        process = self._start()
        asked = None
        while True:
            try:
                code = process.wait(timeout=self.worker.poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            current = self.store.heartbeat(self.job["id"], self.worker.name)
            if current is None:  # another worker took the job (our lease lapsed): let it have it
                process.kill()
                process.wait()
                return
            if asked is None and (current["requested"] or self.worker._stopping.is_set()):
                asked = current["requested"] or "requeue"
                process.send_signal(signal.SIGTERM)
                threading.Timer(STOP_GRACE_S, lambda: process.poll() is None and process.kill()).start()
            self._collect(finished=False)
        self._collect(finished=True)
        self._finish(code, asked)

    def _start(self) -> subprocess.Popen:
        worker, job = self.worker, self.job
        train_row = self.store.get("files", job["training_file"])
        validation_row = self.store.get("files", job["validation_file"]) if job["validation_file"] else None
        count = len(worker.read_examples(job, "training_file"))
        config, _, self.total_steps = jobs.train_config(
            job, model_source=worker.models[job["model"]], train_path=str(worker.data.file(train_row["stored_name"])),
            validation_path=str(worker.data.file(validation_row["stored_name"])) if validation_row else None,
            output=str(self.run_dir), train_examples=count)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / "config.yaml", config.to_yaml())
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "error.json").unlink()
        from feathertune.train.state import checkpoints

        kept = checkpoints(self.run_dir, clean=False)
        worker.event(job, f"Resuming from the checkpoint at step {kept[-1][0]}" if kept else "Fine-tuning job started",
                     data={"worker": worker.name})  # which `serve --worker` ran it, for the dashboard and logs
        env = dict(os.environ)
        if worker.gpus:  # each running job on its own GPU
            env["CUDA_VISIBLE_DEVICES"] = str(self.slot % worker.gpus)
        log = open(self.dir / "runner.log", "a", encoding="utf-8")
        try:
            return subprocess.Popen([sys.executable, "-m", "feathertune.service.runner", str(self.dir)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=die_with_parent)
        finally:
            log.close()

    # -- what the run writes, turned into events, checkpoints, models ---------------------------
    def _last_metrics_step(self) -> int:
        events = self.store.all("events", job_id=self.job["id"], type="metrics")
        return max((e["data"]["step"] for e in events), default=0)

    def _collect(self, finished: bool) -> None:
        steps = _steps_of(self.run_dir / "metrics.jsonl")
        if steps:
            done = sorted(s for s in steps if s > self.metrics_seen and s > 0 and (finished or s < max(steps)))
            for step in done:
                record = steps[step]
                if "train_loss" not in record:
                    continue
                parts = [f"training loss={record['train_loss']:.4f}"]
                if record.get("reward_accuracy") is not None:  # DPO's: pairs whose preferred answer gained more
                    parts.append(f"reward accuracy={record['reward_accuracy']:.2f}")
                if record.get("valid_loss") is not None:
                    parts.append(f"validation loss={record['valid_loss']:.4f}")
                self.worker.event(self.job, f"Step {step}/{self.total_steps}: {', '.join(parts)}",
                                  type="metrics", data={"total_steps": self.total_steps, **record})
                self.metrics_seen = step
            self._progress(steps)
        self._checkpoints(steps)

    def _progress(self, steps: dict[int, dict]) -> None:
        latest = max(steps)
        tokens = sum(r.get("tokens", 0) for r in steps.values())
        if self.step_at_start is None:
            self.step_at_start, self.started = latest, time.time()
        rate = (latest - self.step_at_start) / max(time.time() - self.started, 1e-9)
        eta = int(time.time() + (self.total_steps - latest) / rate) if rate > 0 and latest < self.total_steps else None
        self.store.update_job(self.job["id"], when_worker=self.worker.name, trained_tokens=tokens, estimated_finish=eta)

    def _checkpoints(self, steps: dict[int, dict]) -> None:
        from feathertune.train.state import checkpoints

        known = {row["step_number"] for row in self.store.all("checkpoints", job_id=self.job["id"])}
        for step, path in checkpoints(self.run_dir, clean=False):  # the run may be writing the next one
            if step not in known:
                self._add_checkpoint(step, path / "adapter", steps)

    def _add_checkpoint(self, step: int, adapter: Path, steps: dict[int, dict]) -> None:
        """Keep a copy of the checkpoint's adapter (the run rotates its own away), list it, and make
        it a model chat can use — as each of OpenAI's checkpoints is."""
        target = self.dir / "checkpoints" / f"step-{step:06d}"
        try:  # the run may rotate it away while we copy: then it is simply not listed
            atomic_directory(target, lambda tmp: shutil.copytree(adapter, tmp, dirs_exist_ok=True))
        except (FileNotFoundError, shutil.Error):
            return
        metrics = {"step": step, "train_loss": None, "train_mean_token_accuracy": None, "valid_loss": None,
                   "valid_mean_token_accuracy": None, "full_valid_loss": None, "full_valid_mean_token_accuracy": None}
        metrics.update({k: v for k, v in steps.get(step, {}).items() if k in metrics or k in PREFERENCE_COLUMNS})
        name = jobs.fine_tuned_name(self.job, step)
        # The model first: a worker killed between the two leaves the step unlisted, and the worker
        # that resumes the job lists it (a listed step is never looked at again).
        self._add_model(name, target)
        self.store.insert("checkpoints", {"id": new_id("ftckpt"), "job_id": self.job["id"], "step_number": step,
                                          "metrics": metrics, "fine_tuned_model_checkpoint": name})
        self.worker.event(self.job, f"Checkpoint created at step {step}")

    def _add_model(self, name: str, adapter: Path) -> None:
        if self.store.get("models", name) is None:
            self.store.insert("models", {"id": name, "base": self.job["model"], "job_id": self.job["id"],
                                         "adapter": self.worker.data.relative(adapter)})

    # -- the end ------------------------------------------------------------------------------
    def _finish(self, code: int, asked: str | None) -> None:
        job_id, name = self.job["id"], self.worker.name
        if code == SUCCEEDED:
            model = jobs.fine_tuned_name(self.job)
            steps = _steps_of(self.run_dir / "metrics.jsonl")
            if steps and max(steps) not in {r["step_number"] for r in self.store.all("checkpoints", job_id=job_id)}:
                self._add_checkpoint(max(steps), self.run_dir / "adapter", steps)  # the last epoch's, as OpenAI lists it
            self._add_model(model, self.run_dir / "adapter")
            result = self._result_file(steps)
            self.worker.event(self.job, f"New fine-tuned model created: {model}")
            # The last event goes in before the status, so a client that sees the status has it too.
            self.worker.event(self.job, "The job has successfully completed")
            self.store.update_job(job_id, when_worker=name, status="succeeded", worker=None, requested=None,
                                  fine_tuned_model=model, finished_at=int(time.time()), estimated_finish=None,
                                  result_files=[result])
            return
        if code == STOPPED:
            status = {"cancel": "cancelled", "pause": "paused"}.get(asked, "queued")
            finished = int(time.time()) if status == "cancelled" else None
            self.worker.event(self.job, {"cancelled": "The job was cancelled", "paused": "The job was paused",
                                         "queued": "The worker stopped; the job is queued again"}[status])
            self.store.update_job(job_id, when_worker=name, status=status, worker=None, requested=None,
                                  finished_at=finished, estimated_finish=None)
            return
        error_file = self.dir / "error.json"
        if error_file.is_file():
            import json

            error = json.loads(error_file.read_text())
        else:
            error = {"code": "internal_error", "message": f"the training process ended with code {code}; "
                     f"see jobs/{job_id}/runner.log in the data directory"}
        self.worker._fail(self.job, error["code"], error["message"])

    def _result_file(self, steps: dict[int, dict]) -> str:
        """step_metrics.csv, OpenAI's result file: one row per logged step."""
        out = io.StringIO()
        columns = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        if any("reward_accuracy" in record for record in steps.values()):  # a DPO job: its figures too
            columns += PREFERENCE_COLUMNS
        writer = csv.DictWriter(out, columns, extrasaction="ignore")
        writer.writeheader()
        for step in sorted(s for s in steps if s > 0):
            writer.writerow({k: ("" if v is None else v) for k, v in steps[step].items()})
        file_id = new_id("file")
        stored = self.worker.data.stored_name(file_id, "step_metrics.csv")
        payload = out.getvalue().encode()
        write_atomic(self.worker.data.file(stored), payload)
        self.store.insert("files", {"id": file_id, "filename": "step_metrics.csv", "purpose": "fine-tune-results",
                                    "bytes": len(payload), "stored_name": stored})
        return file_id


def _steps_of(path: Path) -> dict[int, dict]:
    """metrics.jsonl as step → {step, train_loss, valid_loss, lr, tokens} (and a DPO run's reward_accuracy,
    reward_margin, logps_chosen, logps_rejected), training and evaluation records of one step merged."""
    from feathertune.train.dpo import STATS
    from feathertune.train.metrics import read_metrics

    try:
        records = read_metrics(path)
    except (FileNotFoundError, FeathertuneError):
        return {}
    steps: dict[int, dict] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        merged = steps.setdefault(step, {"step": step})
        if "loss" in record:
            merged.update(train_loss=record["loss"], lr=record.get("lr"), tokens=record.get("tokens", 0))
            merged.update({key: record[key] for key in STATS if key in record})
        if "eval_loss" in record:
            merged["valid_loss"] = record["eval_loss"]
    return steps
