"""Every path the service touches, under one data directory, named by the server alone.

    DATA/
      api_key                 the generated key (mode 0600), when none is configured
      state.db                SQLite (the default store)
      files/<file id>.<ext>   uploads and result files, under ids the server chose
      jobs/<job id>/          config.yaml, runner.log, error.json, run/ (the training run directory),
                              checkpoints/step-N/ (each listed checkpoint's adapter, kept for serving)

A request names files, jobs and models by id only; ids are checked against a strict pattern
before they meet a path, and every path is checked to resolve inside DATA.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ID = re.compile(r"^(file|ftjob|ftevent|ftckpt)-[A-Za-z0-9]{8,32}$")
EXTENSIONS = (".jsonl", ".json", ".tsv", ".csv", ".txt")  # what the data readers take


def new_id(kind: str) -> str:
    """file-…, ftjob-…, ftevent-…, ftckpt-…: 24 random letters and digits."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return f"{kind}-" + "".join(alphabet[b % len(alphabet)] for b in os.urandom(24))


class DataDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        for sub in ("files", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def api_key(self) -> Path:
        return self.root / "api_key"

    def inside(self, relative: str | os.PathLike) -> Path:
        """root/relative, refused (ValueError) if it would resolve outside the data directory."""
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"{relative!s} is outside the data directory")
        return path

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def stored_name(self, file_id: str, filename: str) -> str:
        """The server's name for an upload: its id and, if the client's name has one of the
        extensions the readers know, that extension (it tells JSONL from TSV); else .jsonl."""
        assert ID.match(file_id), file_id
        extension = os.path.splitext(filename)[1].lower()
        return file_id + (extension if extension in EXTENSIONS else ".jsonl")

    def file(self, stored_name: str) -> Path:
        return self.inside(Path("files") / stored_name)

    def job(self, job_id: str) -> Path:
        assert ID.match(job_id), job_id
        return self.inside(Path("jobs") / job_id)


def display_name(filename: str | None) -> str:
    """The client's file name as shown back: its last part, printable, at most 255 characters."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(c for c in name if c.isprintable()).strip() or "upload.jsonl"
    return name[:255]
