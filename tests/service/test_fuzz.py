"""The service's OpenAPI schema, fuzzed with schemathesis (bounded, seeded): no 5xx, and every error
in OpenAI's shape `{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}`.

The app runs in process (schemathesis's ASGI transport) over a temporary store, with a real chat
engine on the tiny model. Every operation gets positive and negative cases (the coverage phase's
boundary values, then `MAX_EXAMPLES` fuzzed ones); some of them are steered towards the objects
that exist — a real file and job id, the served model, `feathertune` options that name real
config fields — so that the fuzzing reaches past the 404s into the code that does the work.
Without the key, every operation must answer 401 in the same shape.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

schemathesis = pytest.importorskip("schemathesis")
import hypothesis  # noqa: E402  (schemathesis brings it)
from hypothesis import strategies as st  # noqa: E402
from live import KEY  # noqa: E402
from runs import make_workspace  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

MAX_EXAMPLES = 40  # fuzzed cases per operation, both modes together (the coverage phase adds its own)
SEED = 20240611
MAX_TOKENS = 4  # a steered chat request decodes this many tokens at most: the file stays fast
SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES, deadline=10_000, derandomize=True, database=None, print_blob=False,
    suppress_health_check=list(hypothesis.HealthCheck))
# The checks that hold for this API. Left off, as they fight deliberate behaviour:
# - positive_data_acceptance: a body valid by the schema can still be refused (an unknown model or
#   file is a 404; hyperparameters out of range, a `feathertune` option TrainConfig rejects: 400);
# - use_after_free / ensure_resource_availability / stateful links: the schema declares no links;
# - max_response_time: a chat completion decodes on the CPU (the test's deadline bounds it instead);
# - response_headers_conformance: no operation declares response headers.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, ignored_auth, unsupported_method, missing_required_header]


def openai_error_shape(ctx, response, case) -> None:
    """Every 4xx/5xx: a JSON object with exactly one key, `error`, holding OpenAI's four fields."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if response.status_code == 401:
        assert error["code"] == "invalid_api_key", error
    return None


def config(*, with_key: bool):
    from schemathesis.config import SchemathesisConfig

    values = {
        "seed": SEED,
        "generation": {"mode": "all", "deterministic": True, "database": "none", "max-examples": MAX_EXAMPLES,
                       "with-security-parameters": False},
        "phases": {"stateful": {"enabled": False}},  # the schema declares no links between operations
    }
    if with_key:
        values["auth"] = {"openapi": {"HTTPBearer": {"bearer": KEY}}}
    return SchemathesisConfig.from_dict(values)


# --- the service under test ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from feathertune.models import load_model
    from feathertune.service import jobs
    from feathertune.service.app import create_app
    from feathertune.service.chat import ChatEngine, ChatRequest
    from feathertune.service.paths import DataDir, new_id
    from feathertune.service.store import Store

    root, _ = make_workspace(tmp_path_factory.mktemp("fuzz"))
    data = DataDir(root / "data")
    store = Store.open(f"sqlite:///{data.database}")
    models = {"tiny": str(root / "model")}
    engine = ChatEngine(lambda name: load_model(models[name]))
    # Load the base now, so that no fuzzed request pays for it against the deadline.
    engine.complete(ChatRequest(base="tiny", adapter=None, adapter_key="", messages=[{"role": "user", "content": "hi"}],
                                max_tokens=1, temperature=0.0, top_p=1.0, stop=[], seed=None))
    app = create_app(store=store, data=data, models=models, api_keys=[KEY], engine=engine, max_upload_bytes=1 << 20)
    file_id, spare_file_id = new_id("file"), new_id("file")  # the spare one is for DELETE to find
    for uploaded in (file_id, spare_file_id):
        stored = data.stored_name(uploaded, "train.jsonl")
        data.file(stored).write_bytes((root / "train.jsonl").read_bytes())
        store.insert("files", {"id": uploaded, "filename": "train.jsonl", "purpose": "fine-tune",
                               "bytes": data.file(stored).stat().st_size, "stored_name": stored})
    # A job for each of cancel, pause and resume to act on once (then they are 400s): no worker runs them.
    job_ids = {}
    for action, status in (("cancel", "validating_files"), ("pause", "queued"), ("resume", "paused"), ("", "queued")):
        job = jobs.new_job_row({"model": "tiny", "training_file": file_id}, job_id=new_id("ftjob"),
                               models=set(models), files={file_id: store.get("files", file_id)})
        job_ids[action] = store.insert("jobs", {**job, "status": status})["id"]
    yield SimpleNamespace(app=app, store=store, data=data, file_id=file_id, spare_file_id=spare_file_id,
                          job_ids=job_ids)
    engine.close()
    store.close()


def steer(schema) -> None:
    """A hook that sends a share of the positive cases at what exists (APP.service's), so that they
    get past the 404s. Negative cases are left alone: steering could make them valid."""

    @schema.hook
    def flatmap_case(context, case):
        if case.meta is None or not case.meta.generation.mode.is_positive:
            return st.just(case)
        return st.sampled_from([True, True, False]).flatmap(lambda steered: aimed(case) if steered else st.just(case))


def aimed(case):
    """The case aimed at the service's objects (a strategy: `feathertune` options are drawn)."""
    service, operation = APP.service, case.operation
    action = operation.path.rsplit("/", 1)[-1]
    known = {"file_id": service.spare_file_id if operation.method.upper() == "DELETE" else service.file_id,
             "job_id": service.job_ids.get(action, service.job_ids[""]), "model_id": "tiny"}
    if isinstance(case.path_parameters, dict):
        case.path_parameters = {k: known.get(k, v) for k, v in case.path_parameters.items()}
    body = case.body
    if not isinstance(body, dict):
        return st.just(case)
    if operation.path == "/v1/files":  # a purpose the server takes (the schema says only `string`)
        case.body = {**body, "purpose": "fine-tune"}
    elif operation.path == "/v1/chat/completions":
        # The served model, and few tokens to decode (the fuzzer likes max_tokens=4096).
        case.body = {**body, "model": "tiny"}
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_TOKENS:
                case.body[key] = MAX_TOKENS
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            case.body["max_tokens"] = MAX_TOKENS
    elif operation.path == "/v1/fine_tuning/jobs":
        case.body = {**body, "model": "tiny", "training_file": service.file_id}
        return st.one_of(feathertune_options(), st.none()).map(lambda options: with_options(case, options))
    return st.just(case)


def with_options(case, options):
    if options is not None:
        case.body = {**case.body, "feathertune": options}
    return case


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2, 10**6) | st.text(max_size=12)
                           | st.floats(allow_nan=False, allow_infinity=False),  # what JSON can carry
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)
# Values a config field may well take, so that some option sets pass TrainConfig and get a job.
PLAUSIBLE = st.sampled_from([0, 1, 2, 4, 8, 16, 0.0, 0.1, 0.5, 1e-4, True, False, None, "auto", "all-linear",
                             "lora", "cosine", "adamw", "fp32", "bf16", ["q_proj"], []])
VALUES = PLAUSIBLE | JSON_VALUES


def feathertune_options():
    """`feathertune` options that name real TrainConfig sections and fields, with any JSON values:
    the fuzzing reaches TrainConfig's checks instead of stopping at "unknown key"."""
    from feathertune.registry import METHODS
    from feathertune.train.config import DataConfig, EvalConfig, LoopConfig

    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    adapter_fields = sorted({name for spec in METHODS.values() for name in fields(spec.config_class)})
    sections = {
        "method": st.sampled_from(sorted(METHODS)) | VALUES,
        "quantize": st.sampled_from([None, "nf4", "int8"]) | VALUES,
        "task": st.sampled_from(["auto", "causal_lm", "classification"]) | VALUES,
        "adapter": st.dictionaries(st.sampled_from(adapter_fields), VALUES, max_size=3),
        "train": st.dictionaries(st.sampled_from(fields(LoopConfig)), VALUES, max_size=3),
        "data": st.dictionaries(st.sampled_from([f for f in fields(DataConfig) if f not in ("train", "validation")]),
                                VALUES, max_size=3),
        "eval": st.dictionaries(st.sampled_from(fields(EvalConfig)), VALUES, max_size=3),
    }
    return st.fixed_dictionaries({}, optional=sections)


class DeferredApp:
    """The ASGI app schemathesis calls: the module's service once its fixture has built it. The
    schema is loaded at import (schemathesis parametrizes at collection; its fixture-based loader
    does not run under pytest 9), from an app with the same routes and no state behind them."""

    def __init__(self):
        from feathertune.service.app import create_app

        self.schema_only = create_app(store=None, data=None, models={"tiny": "tiny"}, api_keys=[KEY])
        self.service = None

    async def __call__(self, scope, receive, send):
        await (self.service.app if self.service else self.schema_only)(scope, receive, send)


APP = DeferredApp()
keyed = schemathesis.openapi.from_asgi("/openapi.json", APP, config=config(with_key=True))
steer(keyed)
keyless = schemathesis.openapi.from_asgi("/openapi.json", APP, config=config(with_key=False))


@pytest.fixture(scope="module")
def app(service):
    APP.service = service
    yield service.app
    APP.service = None


@SETTINGS
@keyed.parametrize()
def test_fuzzed_requests_get_no_5xx_and_errors_in_openai_shape(case, app):
    case.call_and_validate(checks=CHECKS, additional_checks=[openai_error_shape])


@hypothesis.settings(SETTINGS, max_examples=3)
@keyless.parametrize()
def test_without_the_key_every_operation_is_401_in_openai_shape(case, app):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance],
                           additional_checks=[openai_error_shape])
    # Before the key is looked at: a method the route does not take (405), a body that cannot be
    # parsed (400). Everything else is a 401.
    if response.request.method != case.operation.method.upper():
        assert response.status_code == 405, (response.status_code, response.text[:300])
        return
    assert response.status_code in (400, 401), (response.status_code, response.text[:300])
    if case.meta is not None and case.meta.generation.mode.is_positive:
        assert response.status_code == 401, (response.status_code, response.text[:300])
