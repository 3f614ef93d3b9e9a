"""One job's training process: `python -m feathertune.service.runner JOB_DIR`.

The worker starts it with JOB_DIR/config.yaml written; it trains through the same `run()` as
`feathertune train` (there is no second training path), into JOB_DIR/run, resuming from the newest
checkpoint there if one exists (a restarted server, a resumed pause). SIGTERM asks it to stop:
after the current step it writes a checkpoint and exits with STOPPED. A failure leaves
JOB_DIR/error.json: {"code", "message"}.
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
import threading
import traceback
from pathlib import Path

SUCCEEDED, FAILED, STOPPED = 0, 1, 3
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent (the worker) dies, so a killed
    server leaves no orphan training beside the one its restart resumes. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    job_dir = Path((argv or sys.argv[1:])[0])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from feathertune.errors import FeathertuneError
    from feathertune.train.config import load_config
    from feathertune.train.loop import RunStopped, run
    from feathertune.train.state import checkpoints

    try:
        config = load_config(job_dir / "config.yaml")
        resume = bool(checkpoints(Path(config.output)))
        run(config, resume=resume, stop=stop.is_set, log=lambda line: print(line, flush=True))
    except RunStopped as exc:
        print(f"stopped: {exc}", flush=True)
        return STOPPED
    except FeathertuneError as exc:
        _write_error(job_dir, "training_failed", str(exc))
        return FAILED
    except Exception as exc:  # noqa: BLE001  (the job fails with the reason; the log keeps the trace)
        traceback.print_exc()
        _write_error(job_dir, "internal_error", f"{type(exc).__name__}: {exc}")
        return FAILED
    return SUCCEEDED


def _write_error(job_dir: Path, code: str, message: str) -> None:
    from feathertune.files import write_atomic

    write_atomic(job_dir / "error.json", json.dumps({"code": code, "message": message}))


if __name__ == "__main__":
    sys.exit(main())
