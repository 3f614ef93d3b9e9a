"""The service on a real PostgreSQL server (a throwaway one, see postgres.py).

- the store: the schema migrates to its version once, however many processes open it at once;
  rows round-trip (insert, get, page, delete) the same on PostgreSQL as on SQLite; `update_job`
  is a compare-and-set; 8 threads claiming 4 queued jobs take each exactly once — on both backends;
- two `serve --worker` processes on one database and one data directory, four jobs: each job runs
  exactly once, and SIGKILLing the worker in the middle of a job lets the other finish it from its
  newest checkpoint, its steps continuing where the checkpoint left them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from live import FAST_OPTIONS, LiveServer, wait_for
from runs import make_workspace

from feathertune.service.paths import new_id
from feathertune.service.store import Store, schema_versions


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A fresh store on each backend (on PostgreSQL: the module's server, its tables emptied)."""
    if request.param == "sqlite":
        opened = Store.open(f"sqlite:///{tmp_path / 'state.db'}")
    else:
        opened = Store.open(request.getfixturevalue("postgres_url"))
        with opened._db.transaction() as db:
            for table in ("files", "jobs", "events", "checkpoints", "models"):
                db.execute(f"DELETE FROM {table}")
    yield opened
    opened.close()


def job_row(**fields) -> dict:
    row = {"id": new_id("ftjob"), "model": "tiny", "training_file": "file-x", "validation_file": None,
           "suffix": None, "seed": 1, "metadata": {"k": "v"}, "method": {"type": "supervised"},
           "options": {"train": {"lr": 0.01}}, "status": "queued", "requested": None, "error": None,
           "fine_tuned_model": None, "finished_at": None, "trained_tokens": None, "estimated_finish": None,
           "result_files": []}
    row.update(fields)
    return row


# -- the store --------------------------------------------------------------------------------
def test_migrations_apply_once_even_when_processes_start_together(postgres_url):
    latest = schema_versions()[-1][0]
    # Four stores (four connections, as four processes would have) open the new database at the
    # same moment: the advisory lock lets one migrate; the others wait, then see its version.
    start, opened, errors = threading.Barrier(4), [], []

    def open_store():
        start.wait()
        try:
            opened.append(Store.open(postgres_url))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not errors and len(opened) == 4, errors
        assert [s.version() for s in opened] == [latest] * 4 and opened[0].kind == "postgresql"
        rows = opened[0]._db.all("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in rows] == [v for v, _ in schema_versions()], rows  # each once
    finally:
        for store in opened:
            store.close()


def test_a_connection_the_server_dropped_is_replaced(postgres_url):
    import psycopg

    store = Store.open(postgres_url)
    try:
        job = store.insert("jobs", job_row())
        with psycopg.connect(postgres_url, autocommit=True) as admin:  # as a server restart would
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(psycopg.OperationalError):
            store.get("jobs", job["id"])  # the call that finds the connection gone fails ...
        assert store.get("jobs", job["id"])["id"] == job["id"]  # ... the next one connects again
        assert store.claim_job("host-elsewhere:1:x", lease_s=600)["id"] == job["id"]
    finally:
        store.close()


def test_rows_round_trip(store):
    row = store.insert("jobs", job_row(metadata={"team": "ä ✓ 100%?"}))
    got = store.get("jobs", row["id"])
    assert got == {**row, "worker": None, "heartbeat_at": None}  # JSON columns decoded, '%' and '?' kept
    assert isinstance(got["created_ns"], int) and got["created_at"] == row["created_ns"] // 1_000_000_000
    assert store.get("jobs", "ftjob-nosuchjob000") is None
    assert store.delete("jobs", row["id"]) and not store.delete("jobs", row["id"])
    assert store.get("jobs", row["id"]) is None


def test_pages_the_same_on_both_backends(store):
    job = "ftjob-" + "a" * 24
    made = [store.insert("events", {"id": new_id("ftevent"), "job_id": job, "level": "info",
                                    "message": f"event {i}", "type": "message", "data": {"i": i},
                                    "created_ns": 1_000 + i // 2})  # pairs share a created_ns: ids break ties
            for i in range(7)]
    store.insert("events", {"id": new_id("ftevent"), "job_id": "ftjob-" + "b" * 24, "level": "info",
                            "message": "another job's", "type": "message", "data": None})
    oldest_first = sorted(made, key=lambda r: (r["created_ns"], r["id"]))
    for newest_first, expected in ((True, oldest_first[::-1]), (False, oldest_first)):
        seen, after, more = [], None, True
        while more:
            rows, more = store.page("events", after=after, limit=3, where={"job_id": job}, newest_first=newest_first)
            seen += rows
            after = rows[-1]["id"] if rows else None
        assert [r["id"] for r in seen] == [r["id"] for r in expected]
        assert [r["data"] for r in seen] == [r["data"] for r in expected]
    assert store.page("events", after="ftevent-unknown00000", limit=3) == ([], False)
    assert len(store.all("events", job_id=job)) == 7 and len(store.all("events")) == 8


def test_update_job_is_a_compare_and_set(store):
    job = store.insert("jobs", job_row(status="running", worker="w1"))
    assert not store.update_job(job["id"], when_status=("queued",), status="cancelled")
    assert not store.update_job(job["id"], when_status=("running",), when_worker="w2", status="cancelled")
    assert store.update_job(job["id"], when_status=("queued", "running"), when_worker="w1", status="succeeded",
                            error={"code": "x"}, result_files=["file-1"])
    got = store.get("jobs", job["id"])
    assert (got["status"], got["error"], got["result_files"]) == ("succeeded", {"code": "x"}, ["file-1"])
    assert not store.update_job(job["id"], when_status=("running",), status="failed")
    assert not store.update_job("ftjob-nosuchjob000", status="failed")


def test_eight_threads_claim_four_jobs_each_once(store):
    jobs = [store.insert("jobs", job_row(created_ns=10 + i)) for i in range(4)]
    claims: list[tuple[str, str]] = []
    start = threading.Barrier(8)

    def claimer(n: int) -> None:
        name = f"host-elsewhere:1:{n}"  # another host: only a lapsed lease could free its jobs
        start.wait()
        deadline = time.time() + 30
        # A claim may find every row locked by another claim in flight (SKIP LOCKED): try until
        # all four are taken, then once more to see that nothing is left.
        while time.time() < deadline:
            job = store.claim_job(name, lease_s=600)
            if job is not None:
                claims.append((job["id"], name))
                assert job["status"] == "running" and job["worker"] == name
            elif len(claims) >= 4:
                return
            time.sleep(0.001)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(job_id for job_id, _ in claims) == sorted(j["id"] for j in jobs), claims
    for job_id, name in claims:
        assert store.get("jobs", job_id)["worker"] == name
    assert store.claim_job("host-elsewhere:1:late", lease_s=600) is None
    # A lapsed lease frees a job: the oldest goes to the next claim.
    store.update_job(jobs[0]["id"], heartbeat_at=time.time() - 1000)
    assert store.claim_job("host-elsewhere:1:late", lease_s=600)["id"] == jobs[0]["id"]


def test_a_same_host_workers_dead_process_frees_its_job_at_once(store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job = store.insert("jobs", job_row(status="running", worker=f"{socket.gethostname()}:{dead.pid}:abc",
                                       heartbeat_at=time.time()))
    claimed = store.claim_job("me", lease_s=600)
    assert claimed["id"] == job["id"] and claimed["worker"] == "me"


# -- two workers, one queue -----------------------------------------------------------------
STEPS = 30  # a step costs ~0.2 s on the tiny model: a kill after the first checkpoint lands mid-job
JOB_OPTIONS = {**FAST_OPTIONS, "train": {**FAST_OPTIONS["train"], "max_steps": STEPS, "checkpoint_every": 3}}


class WorkerProcess:
    """`python -m feathertune.cli serve --worker ...`, its output in a log file."""

    def __init__(self, url: str, data: Path, model: Path, log: Path):
        self.log = log
        command = [sys.executable, "-m", "feathertune.cli", "serve", "--worker", "--database-url", url,
                   "--data-dir", str(data), "--model", f"tiny={model}"]
        env = {k: v for k, v in os.environ.items() if k != "FEATHERTUNE_API_KEY"}  # a worker needs no key
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def name(self) -> str | None:
        """host:pid:token, once it has printed it (it takes jobs from then on)."""
        for line in self.log.read_text().splitlines():
            if line.startswith("[serve --worker] ") and " taking jobs from postgresql" in line:
                return line.split()[2]
        assert self.process.poll() is None, f"the worker exited:\n{self.log.read_text()[-3000:]}"
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def test_two_workers_run_each_job_once_and_one_takes_over_a_killed_workers_job(postgres_url, tmp_path):
    root, _ = make_workspace(tmp_path)
    data, model = tmp_path / "data", tmp_path / "model"
    server = LiveServer(data, {"tiny": model}, "--database-url", postgres_url, "--workers", "0")
    workers = [WorkerProcess(postgres_url, data, model, tmp_path / f"worker-{i}.log") for i in range(2)]
    store = Store.open(postgres_url)
    try:
        server.start()
        names = [wait_for(w.name, 60, what="the worker to start") for w in workers]
        client = server.client()
        with open(root / "train.jsonl", "rb") as f:
            train = client.files.create(file=f, purpose="fine-tune")
        with open(root / "validation.jsonl", "rb") as f:
            validation = client.files.create(file=f, purpose="fine-tune")
        hyper = {"n_epochs": 1, "batch_size": 4}
        jobs = [client.fine_tuning.jobs.create(
            model="tiny", training_file=train.id, validation_file=validation.id, suffix=f"pg{i}", seed=i,
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
            extra_body={"feathertune": JOB_OPTIONS}) for i in range(4)]
        ids = [j.id for j in jobs]

        # The first job to list a checkpoint while running: SIGKILL the worker that runs it.
        def running_with_checkpoint():
            for job_id in ids:
                row = store.get("jobs", job_id)
                if row["status"] == "running" and row["worker"] and store.all("checkpoints", job_id=job_id):
                    return row
            return None

        victim = wait_for(running_with_checkpoint, 120, every=0.05, what="a running job with a checkpoint")
        pid = int(victim["worker"].split(":")[1])
        killed = next(w for w in workers if w.process.pid == pid)
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(30)
        time.sleep(0.5)  # its training process dies with it (PR_SET_PDEATHSIG)
        run_dir = data / "jobs" / victim["id"] / "run"
        before = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert store.get("jobs", victim["id"])["status"] == "running", "the job ended before the kill landed"

        def all_done():
            rows = [store.get("jobs", job_id) for job_id in ids]
            assert not [r for r in rows if r["status"] in ("failed", "cancelled")], [
                (r["id"], r["status"], r["error"]) for r in rows]
            return all(r["status"] == "succeeded" for r in rows)

        wait_for(all_done, 180, every=0.5, what="all four jobs to succeed")

        ran_by = {}
        for job_id in ids:
            events = list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))
            messages = [e.message for e in events]
            starts = [e for e in events if e.message == "Fine-tuning job started"]
            resumes = [e for e in events if e.message.startswith("Resuming from the checkpoint at step ")]
            assert len(starts) == 1, messages  # each job starts once: no worker ran it twice
            assert messages.count("The job has successfully completed") == 1, messages
            assert len(resumes) == (1 if job_id == victim["id"] else 0), messages
            ran_by[job_id] = [e.data["worker"] for e in starts + resumes]
            metric_steps = [e.data["step"] for e in events if e.type == "metrics"]
            assert metric_steps == list(range(1, STEPS + 1)), metric_steps  # each step reported once, in order
            steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id, limit=100)]
            assert len(steps) == len(set(steps)) and STEPS in steps, steps

        # The killed job: started by the killed worker, resumed by the other from step N > 0.
        survivor = names[1 - workers.index(killed)]
        assert ran_by[victim["id"]] == [names[workers.index(killed)], survivor], (ran_by, names)
        assert {w for ran in ran_by.values() for w in ran} == set(names)  # both workers ran jobs
        resumed = next(e.message for e in client.fine_tuning.jobs.list_events(victim["id"], limit=1000)
                       if e.message.startswith("Resuming"))
        step = int(resumed.rsplit(" ", 1)[1])
        assert 0 < step < STEPS, resumed
        assert f"(step {step} of {STEPS})" in (run_dir.parent / "runner.log").read_text()
        # Its metrics continue from the checkpoint: the killed run's records up to step N are kept as
        # written (a restarted run would rewrite them, with other tokens_per_s), the rest follow once.
        after = (run_dir / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in before if _record(line).get("step", STEPS) <= step]
        assert after[:len(kept)] == kept
        trained = [json.loads(line)["step"] for line in after if "loss" in json.loads(line)]
        assert trained == list(range(1, STEPS + 1)), trained
        assert Counter(r["job_id"] for r in store.all("models"))[victim["id"]] == len(
            store.all("checkpoints", job_id=victim["id"])) + 1  # a model per checkpoint, and the final one
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
        store.close()


def _record(line: str) -> dict:
    """A metrics.jsonl line; {} for a line the kill tore."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {}
