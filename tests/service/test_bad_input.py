"""Bad input against a live `feathertune serve`: each gets the right status and an error in OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, and the server stays up.

- no key, a wrong key, another scheme: 401 on every /v1 route (and the key compared in constant time);
- a malformed JSONL file: the job is created, then `failed`, naming the line and the problem (never
  the server's paths);
- an unknown model, file or job: 404, as the `openai` client's NotFoundError with the error's code;
- a path-like upload name: stored under the server's own name, nothing written outside the data dir;
- an upload over --max-upload-mb: 413, with a Content-Length and without one (chunked);
- a body that is not JSON, misses fields or has wrong types: 400; cancel or resume in the wrong state: 400.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import textwrap
import uuid

import pytest
import requests
from live import KEY, LiveServer, wait_for, wait_status, workspace_server

openai = pytest.importorskip("openai")

JSON = {"Content-Type": "application/json"}
MISSING = {"model": "no-such-model", "file": "file-doesnotexist0000", "job": "ftjob-doesnotexist0000"}
# One route of each kind, with the body it needs (a valid one where it takes one: only the key is wrong).
ROUTES = [
    ("GET", "/files", None), ("POST", "/files", "upload"), ("GET", f"/files/{MISSING['file']}", None),
    ("DELETE", f"/files/{MISSING['file']}", None), ("GET", f"/files/{MISSING['file']}/content", None),
    ("GET", "/fine_tuning/jobs", None), ("POST", "/fine_tuning/jobs", {"model": "tiny", "training_file": "file-x"}),
    ("GET", f"/fine_tuning/jobs/{MISSING['job']}", None),
    *(("POST", f"/fine_tuning/jobs/{MISSING['job']}/{action}", None) for action in ("cancel", "pause", "resume")),
    ("GET", f"/fine_tuning/jobs/{MISSING['job']}/events", None),
    ("GET", f"/fine_tuning/jobs/{MISSING['job']}/checkpoints", None),
    ("GET", "/models", None), ("GET", "/models/tiny", None), ("DELETE", "/models/tiny", None),
    ("POST", "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with workspace_server(tmp_path_factory.mktemp("bad-input")) as live:
        yield live


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A server that takes uploads of 1 MB at most (and trains nothing)."""
    root = tmp_path_factory.mktemp("small-limit")
    live = LiveServer(root / "data", {"tiny": root / "no-model"}, "--max-upload-mb", "1", "--workers", "0").start()
    live.root = root
    yield live
    live.stop()


def call(server, method: str, path: str, *, key: str | None = KEY, body=None, **kwargs) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if body == "upload":
        kwargs["files"] = {"file": ("train.jsonl", b'{"messages": []}\n')}
        kwargs["data"] = {"purpose": "fine-tune"}
    elif body is not None:
        kwargs["json"] = body
    return requests.request(method, server.url + path, headers=headers, timeout=60, **kwargs)


def error_of(response: requests.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The error object of an answer that must be `status` in OpenAI's shape; checks code/param if given."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def upload(server, content: bytes, name: str = "train.jsonl") -> dict:
    response = call(server, "POST", "/files", files={"file": (name, content)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def tree(root) -> dict[str, tuple[int, int]]:
    """Every file under `root` (relative path → size, mtime_ns)."""
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            info = os.stat(path)
            found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return found


# --- the key ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_wants_the_key(server, method, path, body):
    for key in (None, "wrong-key", KEY + "x", KEY[:-1], ""):
        error = error_of(call(server, method, path, key=key, body=body), 401, code="invalid_api_key")
        assert KEY not in error["message"]
    other_scheme = call(server, method, path, key=None, body=body, headers={"Authorization": f"Basic {KEY}"})
    error_of(other_scheme, 401, code="invalid_api_key")


def test_the_openai_client_raises_authentication_error(server):
    client = openai.OpenAI(base_url=server.url, api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.fine_tuning.jobs.create(model="tiny", training_file=MISSING["file"])


def test_the_key_is_compared_in_constant_time():
    """By inspection (a timing test would be flaky): `authorized` compares with hmac.compare_digest
    and never with ==, != or `in`."""
    from feathertune.service import app

    module = ast.parse(textwrap.dedent(inspect.getsource(app)))
    [authorized] = [n for n in ast.walk(module) if isinstance(n, ast.FunctionDef) and n.name == "authorized"]
    calls = {ast.unparse(n.func) for n in ast.walk(authorized) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls, calls
    compares = [ast.unparse(n) for n in ast.walk(authorized) if isinstance(n, ast.Compare)]
    assert not compares, f"the key is compared with an operator: {compares}"


# --- unknown ids: 404 -----------------------------------------------------------------------------------

def test_unknown_ids_are_404_through_the_openai_client(server):
    client = server.client()
    attempts = {
        "model_not_found": [lambda: client.models.retrieve(MISSING["model"]),
                            lambda: client.models.delete(MISSING["model"]),
                            lambda: client.fine_tuning.jobs.create(model=MISSING["model"],
                                                                   training_file=MISSING["file"]),
                            lambda: client.chat.completions.create(model=MISSING["model"],
                                                                   messages=[{"role": "user", "content": "hi"}])],
        "file_not_found": [lambda: client.files.retrieve(MISSING["file"]),
                           lambda: client.files.delete(MISSING["file"]),
                           lambda: client.files.content(MISSING["file"]),
                           lambda: client.fine_tuning.jobs.create(model="tiny", training_file=MISSING["file"])],
        "fine_tuning_job_not_found": [lambda: client.fine_tuning.jobs.retrieve(MISSING["job"]),
                                      lambda: client.fine_tuning.jobs.cancel(MISSING["job"]),
                                      lambda: client.fine_tuning.jobs.pause(MISSING["job"]),
                                      lambda: client.fine_tuning.jobs.resume(MISSING["job"]),
                                      lambda: client.fine_tuning.jobs.list_events(MISSING["job"]),
                                      lambda: client.fine_tuning.jobs.checkpoints.list(MISSING["job"])],
    }
    for code, calls in attempts.items():
        for attempt in calls:
            with pytest.raises(openai.NotFoundError) as raised:
                attempt()
            assert raised.value.status_code == 404 and raised.value.code == code, (code, raised.value.body)
            assert raised.value.type == "invalid_request_error"
    with pytest.raises(openai.PermissionDeniedError) as raised:  # a base model cannot be deleted
        client.models.delete("tiny")
    assert raised.value.code == "model_not_deletable"


def test_unknown_ids_are_404_in_openai_shape(server):
    error = error_of(call(server, "GET", f"/models/{MISSING['model']}"), 404, "model_not_found", "model")
    assert MISSING["model"] in error["message"]
    error = error_of(call(server, "GET", f"/files/{MISSING['file']}"), 404, "file_not_found", "file_id")
    assert MISSING["file"] in error["message"]
    error_of(call(server, "GET", f"/fine_tuning/jobs/{MISSING['job']}/events"), 404, "fine_tuning_job_not_found",
             "fine_tuning_job_id")
    created = call(server, "POST", "/fine_tuning/jobs", body={"model": "tiny", "training_file": MISSING["file"]})
    error_of(created, 404, "file_not_found", "training_file")
    error_of(call(server, "GET", "/no-such-route"), 404)  # a route that does not exist: the same shape
    not_allowed = call(server, "PUT", "/models")
    error_of(not_allowed, 405)
    assert not_allowed.headers.get("allow") == "GET", not_allowed.headers  # RFC 9110: a 405 names what is allowed


# --- malformed training data ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def malformed_jobs(server):
    """Jobs on a file with a JSON syntax error on line 3, and on one whose line 2 has no `messages`
    and line 4 a role that does not exist: name → (file, the job once it ended)."""
    good = (server.root / "train.jsonl").read_text().splitlines()
    broken_json = [good[0], good[1], '{"messages": [{"role": "user", "content": "hi"}', good[2]]
    bad_records = [good[0], json.dumps({"prompt": "no messages here"}), good[1],
                   json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                            {"role": "assistant", "content": "x"}]})]
    client = server.client()
    created = {}
    for name, lines in (("broken.jsonl", broken_json), ("records.jsonl", bad_records)):
        file = upload(server, ("\n".join(lines) + "\n").encode(), name)
        job = client.fine_tuning.jobs.create(model="tiny", training_file=file["id"])
        # Accepted: the worker reads the file (and may have failed it already, before this answer).
        assert job.status in ("validating_files", "failed")
        created[name] = (file, job.id)
    return {name: (file, wait_status(client, job_id, {"failed", "succeeded", "cancelled"}, timeout=60))
            for name, (file, job_id) in created.items()}


def test_a_malformed_jsonl_fails_the_job_naming_the_line(server, malformed_jobs):
    expected = {"broken.jsonl": [r":3: json: not valid JSON"],
                "records.jsonl": [r":2: messages: missing", r":4: messages\[0\]\.role: 'wizard' is not one of"]}
    data_dir = server.data_dir.resolve()
    for name, (file, job) in malformed_jobs.items():
        assert job.status == "failed", job
        assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
        message = job.error.message
        assert file["id"] in message and all(re.search(p, message) for p in expected[name]), message
        for leak in (str(data_dir), str(server.data_dir), str(server.root), "/files/"):
            assert leak not in message, message
        events = [e.message for e in server.client().fine_tuning.jobs.list_events(job.id, limit=50)]
        assert any("failed" in e for e in events) and not any(str(data_dir) in e for e in events), events


def test_cancel_or_resume_in_the_wrong_state_is_400(server, malformed_jobs):
    client = server.client()
    _, failed = malformed_jobs["broken.jsonl"]
    for action in ("cancel", "pause", "resume"):
        error = error_of(call(server, "POST", f"/fine_tuning/jobs/{failed.id}/{action}"), 400,
                         "invalid_job_status", "fine_tuning_job_id")
        assert "'failed'" in error["message"], error
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.cancel(failed.id)
    assert raised.value.code == "invalid_job_status"
    # A job cancelled before it trains: cancelling again, or resuming it, is a 400 too.
    file = upload(server, (server.root / "train.jsonl").read_bytes())
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file["id"])
    client.fine_tuning.jobs.cancel(job.id)
    wait_status(client, job.id, {"cancelled"}, timeout=60)
    for action in ("cancel", "resume"):
        error = error_of(call(server, "POST", f"/fine_tuning/jobs/{job.id}/{action}"), 400, "invalid_job_status")
        assert "'cancelled'" in error["message"], error
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)


# --- upload names ---------------------------------------------------------------------------------------

PATH_LIKE = ["../../evil.jsonl", "/etc/passwd", "..\\..\\x.jsonl", "a\x00b.jsonl", "line\nbreak\r\n.jsonl",
             "....//....//deep.jsonl", "%2e%2e%2fenc.jsonl", "."]


def raw_multipart(filename: bytes, content: bytes, purpose: bytes = b"fine-tune") -> tuple[bytes, str]:
    """A multipart body with the file name's bytes exactly as given (requests would escape them)."""
    boundary = uuid.uuid4().hex
    parts = [b"--" + boundary.encode(), b'Content-Disposition: form-data; name="purpose"', b"", purpose,
             b"--" + boundary.encode(), b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"',
             b"Content-Type: application/octet-stream", b"", content, b"--" + boundary.encode() + b"--", b""]
    return b"\r\n".join(parts), f"multipart/form-data; boundary={boundary}"


def outside_data(server) -> dict[str, tuple[int, int]]:
    """The files of the test's tree outside the data directory, but for the server's own log."""
    return {p: s for p, s in tree(server.root).items() if not p.startswith("data" + os.sep) and p != server.log.name}


def test_path_like_upload_names_stay_in_the_data_dir(server):
    before_outside = outside_data(server)
    passwd = os.stat("/etc/passwd")
    stored_before = set(os.listdir(server.data_dir / "files"))
    uploaded = []
    for name in PATH_LIKE:
        content = f'{{"name": {json.dumps(name)}}}\n'.encode()
        file = upload(server, content, name)  # as requests sends it (control characters escaped)
        uploaded.append((file, content))
        assert "/" not in file["filename"] and "\\" not in file["filename"], file
        assert all(c.isprintable() for c in file["filename"]), file
        body, content_type = raw_multipart(name.encode(), content)  # the bytes raw, as a hostile client might
        response = call(server, "POST", "/files", data=body, headers={"Content-Type": content_type})
        if response.status_code == 200:
            uploaded.append((response.json(), content))
            assert "/" not in response.json()["filename"] and "\\" not in response.json()["filename"]
        else:
            error_of(response, 400)  # a name that breaks the multipart header: refused, in shape
    for file, content in uploaded:
        got = call(server, "GET", f"/files/{file['id']}/content")
        assert got.status_code == 200 and got.content == content, (file, got.status_code)
        assert "\n" not in got.headers.get("content-disposition", "")
    after_outside = outside_data(server)
    assert after_outside == before_outside, set(after_outside) ^ set(before_outside)
    assert os.stat("/etc/passwd").st_mtime_ns == passwd.st_mtime_ns
    new = set(os.listdir(server.data_dir / "files")) - stored_before
    assert len(new) == len(uploaded), new
    assert all(re.fullmatch(r"file-[A-Za-z0-9]+\.jsonl", n) for n in new), new  # the server's names only


# --- upload size ----------------------------------------------------------------------------------------

def test_an_upload_over_the_limit_is_413(small_server):
    files_dir = small_server.data_dir / "files"
    two_mb = b'{"messages": []}\n' * (2 * (1 << 20) // 17 + 1)
    with_length = call(small_server, "POST", "/files", files={"file": ("big.jsonl", two_mb)},
                       data={"purpose": "fine-tune"})
    error_of(with_length, 413, "file_too_large", "file")
    body, content_type = raw_multipart(b"big.jsonl", two_mb)

    def chunks():  # no Content-Length: requests sends a generator with Transfer-Encoding: chunked
        for start in range(0, len(body), 64 << 10):
            yield body[start:start + (64 << 10)]

    chunked = call(small_server, "POST", "/files", data=chunks(), headers={"Content-Type": content_type})
    sent = chunked.request.headers
    assert sent.get("Transfer-Encoding") == "chunked" and "Content-Length" not in sent, sent
    error_of(chunked, 413, "file_too_large", "file")
    assert os.listdir(files_dir) == []  # nothing kept, not even a part
    small = call(small_server, "POST", "/files", files={"file": ("ok.jsonl", b"{}\n" * 1000)},
                 data={"purpose": "fine-tune"})
    assert small.status_code == 200, small.text  # under the limit: taken
    assert call(small_server, "GET", "/models").status_code == 200


# --- bodies that are not JSON, miss fields or have the wrong types: 400 ------------------------------------

def test_bad_bodies_are_400(server):
    file = upload(server, (server.root / "train.jsonl").read_bytes())
    job = {"model": "tiny", "training_file": file["id"]}
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        ("/fine_tuning/jobs", {"training_file": file["id"]}, "model", "missing_required_parameter"),
        ("/fine_tuning/jobs", {"model": "tiny"}, "training_file", "missing_required_parameter"),
        ("/fine_tuning/jobs", {**job, "model": 3}, "model", None),
        ("/fine_tuning/jobs", {**job, "training_file": ["a"]}, "training_file", None),
        ("/fine_tuning/jobs", {**job, "training_file": ""}, "training_file", None),
        ("/fine_tuning/jobs", {**job, "seed": "seven"}, "seed", None),
        ("/fine_tuning/jobs", {**job, "seed": -1}, "seed", None),
        ("/fine_tuning/jobs", {**job, "seed": True}, "seed", None),  # not silently seed 1
        ("/fine_tuning/jobs", {**job, "suffix": "has spaces/slash"}, "suffix", None),
        ("/fine_tuning/jobs", {**job, "metadata": {"a": 1}}, None, None),
        ("/fine_tuning/jobs", {**job, "metadata": "x"}, "metadata", None),
        ("/fine_tuning/jobs", {**job, "hyperparameters": {"n_epochs": "many"}}, None, None),
        ("/fine_tuning/jobs", {**job, "hyperparameters": {"n_epochs": 0}}, None, None),
        ("/fine_tuning/jobs", {**job, "hyperparameters": {"epochs": 2}}, "hyperparameters", None),
        ("/fine_tuning/jobs", {**job, "method": {"type": "reinforcement"}}, "method.type", None),
        ("/fine_tuning/jobs", {**job, "method": {"type": "dpo"}}, "training_file", "invalid_training_file"),  # chat data
        ("/fine_tuning/jobs", {**job, "method": {"type": "supervised", "supervised": "x"}}, "method.supervised", None),
        ("/fine_tuning/jobs", {**job, "method": {"type": "supervised", "hyperparameters": {"n_epochs": 3}}}, "method",
         None),  # misplaced: not silently trained with "auto"
        ("/fine_tuning/jobs", {**job, "feathertune": {"data": {"train": "/etc/passwd"}}}, "feathertune.data", None),
        ("/fine_tuning/jobs", {**job, "feathertune": {"output": "/tmp/x"}}, "feathertune", None),
        ("/fine_tuning/jobs", {**job, "feathertune": {"adapter": {"r": -3}}}, "feathertune", "invalid_config"),
        ("/fine_tuning/jobs", {**job, "feathertune": "lora"}, "feathertune", None),
        ("/fine_tuning/jobs", [job], None, None),
        ("/fine_tuning/jobs", None, None, None),
        ("/chat/completions", {"model": "tiny", "messages": []}, "messages", None),
        ("/chat/completions", {"model": "tiny", "messages": hi, "temperature": 5}, "temperature", None),
        ("/chat/completions", {"model": "tiny", "messages": hi, "top_p": 0}, "top_p", None),
        ("/chat/completions", {"model": "tiny", "messages": hi, "max_tokens": 0}, "max_tokens", None),
        ("/chat/completions", {"model": "tiny", "messages": hi, "n": 2}, "n", None),
        ("/chat/completions", {"model": "tiny", "messages": hi, "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ("/chat/completions", {"model": "tiny", "messages": "hi"}, "messages", None),
        ("/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, None, None),
        ("/chat/completions", {"model": "tiny", "messages": [{"content": "hi"}]}, None, "missing_required_parameter"),
        ("/chat/completions", {"messages": hi}, "model", "missing_required_parameter"),
        ("/chat/completions", {"model": "tiny", "messages": hi, "stream": "yes please"}, "stream", None),
        ("/chat/completions", {"model": "tiny", "messages": hi, "max_tokens": "5"}, "max_tokens", None),
        ("/chat/completions", {"model": "tiny", "messages": hi, "temperature": "0.5"}, "temperature", None),
    ]
    for path, body, param, code in cases:
        response = call(server, "POST", path, json=body) if body is not None else call(server, "POST", path)
        assert response.status_code == 400, (path, body, response.text[:300])
        error = error_of(response, 400, code, param)
        assert error["type"] == "invalid_request_error", (path, body, error)
    for path in ("/fine_tuning/jobs", "/chat/completions"):
        response = call(server, "POST", path, data=b"not json", headers=JSON)
        assert "not valid JSON" in error_of(response, 400, "invalid_json")["message"]
        for raw in (b"not json", b'{"model": "tiny",', b"\xff\xfe", b"", b"[]", b"null", b'"text"', b"1e999"):
            error_of(call(server, "POST", path, data=raw, headers=JSON), 400)
        error_of(call(server, "POST", path, data=b"model=tiny", headers={"Content-Type": "text/plain"}), 400)
    nan = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    error_of(call(server, "POST", "/chat/completions", data=nan, headers=JSON), 400)
    infinite = f'{{"model": "tiny", "training_file": "{file["id"]}", "hyperparameters": {{"n_epochs": Infinity}}}}'
    error_of(call(server, "POST", "/fine_tuning/jobs", data=infinite, headers=JSON), 400)
    # JSON can escape a lone surrogate, which is not Unicode: SQLite, the tokenizer and the answer's
    # JSON could not encode it.
    for path, raw in (("/fine_tuning/jobs", '{"model": "tiny", "training_file": "\\ud800"}'),
                      ("/fine_tuning/jobs", '{"model": "tiny", "training_file": "%s", "metadata": {"k": "\\udfff"}}'
                       % file["id"]),
                      ("/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}')):
        error = error_of(call(server, "POST", path, data=raw.encode(), headers=JSON), 400)
        assert "lone UTF-16 surrogate" in error["message"], error
    for query in ("limit=0", "limit=abc", "limit=100000", "order=sideways"):
        error_of(call(server, "GET", f"/files?{query}"), 400)
    error_of(call(server, "GET", "/fine_tuning/jobs?limit=-1"), 400, param="limit")
    error_of(call(server, "POST", "/files", data={"purpose": "fine-tune"}), 400, "missing_required_parameter", "file")
    error_of(call(server, "POST", "/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "nonsense"}),
             400, param="purpose")
    error_of(call(server, "POST", "/files", files={"file": ("a.jsonl", b"{}\n")}), 400, param="purpose")


def test_the_openai_client_raises_bad_request_error(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert raised.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(model="tiny", training_file="")
    assert raised.value.param == "training_file"


def test_the_server_is_still_up(server):
    assert server.process.poll() is None, server.log.read_text()[-3000:]
    response = call(server, "GET", "/models")
    assert response.status_code == 200 and "tiny" in [m["id"] for m in response.json()["data"]]
    reply = wait_for(lambda: call(server, "POST", "/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}), timeout=60)
    assert reply.status_code == 200, reply.text[:500]
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    assert "Traceback" not in server.log.read_text()  # no handler crashed along the way


@pytest.mark.parametrize("settings", [{"temperature": 1e-300}, {"temperature": 2, "top_p": 1e-300}])
def test_extreme_sampling_settings_are_not_a_500(server, settings):
    """A temperature or top_p that underflows float32 (greedy in all but name) still samples."""
    response = call(server, "POST", "/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **settings})
    assert response.status_code == 200, (settings, response.text[:300])
