"""Where the service's API keys come from: $FEATHERTUNE_API_KEY (the other tests), a key file, or
one generated at the first start — printed, kept in DATA/api_key (0600) and reused after a restart."""

from __future__ import annotations

import re
import stat

import pytest
import requests
from live import LiveServer

pytest.importorskip("openai")


def models_status(server: LiveServer, key: str) -> int:
    return requests.get(f"{server.url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def test_a_key_is_generated_printed_kept_and_reused(tmp_path):
    server = LiveServer(tmp_path / "data", {"tiny": tmp_path / "no-model"}, "--workers", "0", key=None).start()
    try:
        printed = re.search(r"generated an API key .*\n\s+(ft-\S+)", server.log.read_text()).group(1)
        kept = tmp_path / "data" / "api_key"
        assert kept.read_text().strip() == printed
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # a secret: the owner's alone
        assert models_status(server, printed) == 200 and models_status(server, printed + "x") == 401
    finally:
        server.stop()
    server.start()  # the same data directory: the same key, not a new one
    try:
        assert models_status(server, printed) == 200
        assert server.log.read_text().count("generated an API key") == 1
    finally:
        server.stop()


def test_a_key_file_holds_the_accepted_keys(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("first-key-aaaaaaaa\n\nsecond-key-bbbbbbbb\n")
    server = LiveServer(tmp_path / "data", {"tiny": tmp_path / "no-model"}, "--workers", "0",
                        "--api-key-file", str(keys), key=None).start()
    try:
        assert models_status(server, "first-key-aaaaaaaa") == 200
        assert models_status(server, "second-key-bbbbbbbb") == 200
        assert models_status(server, "third-key") == 401
        assert not (tmp_path / "data" / "api_key").exists()
    finally:
        server.stop()
