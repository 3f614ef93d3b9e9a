"""A live `feathertune serve` on loopback for the service tests: a subprocess on a free port, with a
tiny chat model, killed (SIGKILL) or stopped (SIGTERM) as a test needs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import requests
from runs import make_workspace

KEY = "ft-test-key-0123456789"
# Small and fast: a LoRA on the tiny model, a handful of steps, a short evaluation.
FAST_OPTIONS = {"method": "lora", "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
                "train": {"lr": 5e-3, "warmup_steps": 1}, "data": {"max_length": 256},
                "eval": {"max_new_tokens": 8, "batch_size": 4}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m feathertune.cli serve ARGS` with FEATHERTUNE_API_KEY=KEY; `url` is its /v1."""

    def __init__(self, data_dir: Path, models: dict[str, Path], *args: str, key: str | None = KEY,
                 port: int | None = None):
        self.data_dir, self.models, self.args, self.key = Path(data_dir), models, list(args), key
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"server-{self.port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def start(self, timeout: float = 60) -> LiveServer:
        env = {k: v for k, v in os.environ.items() if k != "FEATHERTUNE_API_KEY"}
        if self.key is not None:
            env["FEATHERTUNE_API_KEY"] = self.key
        command = [sys.executable, "-m", "feathertune.cli", "serve", "--port", str(self.port),
                   "--data-dir", str(self.data_dir), *self.args]
        for name, path in self.models.items():
            command += ["--model", f"{name}={path}"]
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.base + "/", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash or the out-of-memory killer would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=self.key, max_retries=0, timeout=60)


def wait_for(predicate, timeout: float = 120, every: float = 0.2, what: str = "the condition"):
    """Poll `predicate()` until it returns something truthy; that value, or AssertionError."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_status(client, job_id: str, statuses: set[str], timeout: float = 180):
    def reached():
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in statuses else None

    return wait_for(reached, timeout, what=f"job {job_id} to reach {sorted(statuses)}")


@contextlib.contextmanager
def workspace_server(root: Path, *args: str, model_name: str = "tiny") -> Iterator[LiveServer]:
    """runs.make_workspace(root) (a tiny chat model, E2E slices), then a LiveServer serving that model
    as `model_name`, with `.root` set; stopped on leaving, whatever happened inside."""
    make_workspace(root)
    live = LiveServer(root / "data", {model_name: root / "model"}, *args).start()
    live.root = root
    try:
        yield live
    finally:
        live.stop()
