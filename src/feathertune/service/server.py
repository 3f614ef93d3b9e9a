"""`feathertune serve`: the API, the chat engine and the workers in one process; or, with
`--worker`, a worker alone that takes jobs from a shared PostgreSQL queue.

    feathertune serve --data-dir DATA --model smollm2-135m-instruct --model tiny=/path/to/model
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import threading
from pathlib import Path

from feathertune.errors import ConfigError
from feathertune.service.paths import DataDir
from feathertune.service.store import Store

KEY_VARIABLE = "FEATHERTUNE_API_KEY"


@dataclasses.dataclass
class Settings:
    data_dir: str
    models: dict[str, str]  # name clients use → what load_model loads (embedded name or directory)
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str | None = None  # None: sqlite:///DATA/state.db
    workers: int = 1  # jobs trained at once by this process (0: API only)
    worker_only: bool = False  # no API: take jobs from the shared store (`serve --worker`)
    max_upload_mb: int = 512
    max_adapters: int = 8  # fine-tuned adapters kept in memory for chat (least recently used leave)
    api_key_file: str | None = None
    lease_s: float = 30.0  # a running job whose worker has not said it is alive for this long is taken over


def parse_models(values: list[str] | None, default: str) -> dict[str, str]:
    """--model NAME or NAME=SOURCE (a model directory, a .gguf file, an embedded name)."""
    models = {}
    for value in values or [default]:
        name, _, source = value.partition("=")
        if not name or ":" in name or "/" in name:
            raise ConfigError(f"--model {value!r}: give NAME or NAME=PATH, the name without ':' or '/'", source="serve")
        models[name] = str(Path(source).absolute()) if source and Path(source).exists() else (source or name)
    return models


def api_keys(settings: Settings, data: DataDir, say=print) -> list[str]:
    """The keys the API accepts: $FEATHERTUNE_API_KEY, else --api-key-file, else the data
    directory's api_key, generated (and printed) at the first start."""
    if os.environ.get(KEY_VARIABLE):
        return [os.environ[KEY_VARIABLE]]
    if settings.api_key_file:
        keys = [line.strip() for line in Path(settings.api_key_file).read_text().splitlines() if line.strip()]
        if not keys:
            raise ConfigError(f"{settings.api_key_file}: no key in it (one key per line)", source="serve")
        return keys
    if data.api_key.is_file():
        return [data.api_key.read_text().strip()]
    key = "ft-" + secrets.token_urlsafe(32)
    fd = os.open(data.api_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    say(f"[serve] generated an API key (kept in {data.api_key}):\n    {key}")
    return [key]


def open_store(settings: Settings, data: DataDir) -> Store:
    return Store.open(settings.database_url or f"sqlite:///{data.database}")


def serve(settings: Settings) -> int:
    import uvicorn

    from feathertune.service.app import create_app
    from feathertune.service.worker import Worker

    data = DataDir(settings.data_dir)
    store = open_store(settings, data)
    if settings.worker_only:
        return _work(settings, store, data)
    keys = api_keys(settings, data)
    engine = _chat_engine(settings)
    worker = Worker(store, data, settings.models, slots=settings.workers, lease_s=settings.lease_s,
                    gpus=_gpu_count()) if settings.workers > 0 else None
    app = create_app(store=store, data=data, models=settings.models, api_keys=keys, engine=engine,
                     max_upload_bytes=settings.max_upload_mb << 20)
    if worker is not None:
        worker.start()
    print(f"[serve] feathertune on http://{settings.host}:{settings.port} (dashboard at /, API at /v1); "
          f"data in {data.root}; models: {', '.join(settings.models)}", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        if worker is not None:
            worker.stop()  # running jobs checkpoint and go back to the queue
        engine.close()
        store.close()
    return 0


def _work(settings: Settings, store: Store, data: DataDir) -> int:
    """A worker alone: run jobs until SIGTERM or SIGINT, then let the running ones checkpoint."""
    from feathertune.service.worker import Worker

    worker = Worker(store, data, settings.models, slots=max(settings.workers, 1), lease_s=settings.lease_s,
                    gpus=_gpu_count())
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    worker.start()
    print(f"[serve --worker] {worker.name} taking jobs from {store.kind}; data in {data.root}", flush=True)
    done.wait()
    worker.stop()
    store.close()
    return 0


def _chat_engine(settings: Settings):
    from feathertune.models import load_model
    from feathertune.service.chat import ChatEngine

    def load_base(name: str):
        import torch

        model, tokenizer = load_model(settings.models[name])
        return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer

    return ChatEngine(load_base, max_adapters=settings.max_adapters)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0

