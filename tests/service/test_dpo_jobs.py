"""DPO jobs through the official `openai` client, unchanged, against a live `feathertune serve`:
`method={"type": "dpo", "dpo": {"hyperparameters": {...}}}` trains the same `run()` with
train.objective=dpo and train.dpo_beta=beta, the job reports its method as OpenAI's jobs do, and the
run's reward figures reach the events, the checkpoints and step_metrics.csv.

A job whose files do not fit its method (a dpo job on chat examples, a supervised one on preference
pairs) and a method body that is wrong are 400s at creation, naming the field.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml
from live import FAST_OPTIONS, wait_status, workspace_server

openai = pytest.importorskip("openai")

TRAIN_PAIRS, VALIDATION_PAIRS = 16, 4
DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}}
RUN_FIGURES = ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


def preference_pairs(root, start: int, count: int) -> bytes:
    """`count` pairs from the workspace's E2E lines (whose words the tiny tokenizer knows): the prompt,
    its own reference preferred, the next line's reference (another restaurant) not preferred."""
    rows = [json.loads(line)["messages"] for line in (root / "train.jsonl").read_text().splitlines()]
    pairs = []
    for i in range(start, start + count):
        (user, answer), (_, other) = rows[i][-2:], rows[(i + 1) % len(rows)][-2:]
        pairs.append({"input": {"messages": [user]}, "preferred_output": [answer],
                      "non_preferred_output": [{"role": "assistant", "content": other["content"]}]})
    return "".join(json.dumps(pair) + "\n" for pair in pairs).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with workspace_server(tmp_path_factory.mktemp("dpo")) as live:
        yield live


@pytest.fixture(scope="module")
def files(server):
    """Uploaded: preference pairs (training, validation) and chat examples (training, validation)."""
    client = server.client()

    def upload(name: str, content: bytes):
        return client.files.create(file=(name, content), purpose="fine-tune")

    return {"pairs": upload("pairs.jsonl", preference_pairs(server.root, 0, TRAIN_PAIRS)),
            "validation_pairs": upload("validation-pairs.jsonl",
                                       preference_pairs(server.root, TRAIN_PAIRS, VALIDATION_PAIRS)),
            "chat": upload("chat.jsonl", (server.root / "train.jsonl").read_bytes()),
            "validation_chat": upload("validation-chat.jsonl", (server.root / "validation.jsonl").read_bytes())}


@pytest.fixture(scope="module")
def dpo_job(server, files):
    """A DPO job run to its end: (the job as created, the job once finished)."""
    client = server.client()
    created = client.fine_tuning.jobs.create(
        model="tiny", training_file=files["pairs"].id, validation_file=files["validation_pairs"].id, suffix="dpo",
        seed=5, method=DPO, extra_body={"feathertune": FAST_OPTIONS})
    return created, wait_status(client, created.id, {"succeeded", "failed", "cancelled"})


# --- a DPO job, end to end ----------------------------------------------------------------------------

def test_a_dpo_job_trains_to_a_model_that_answers(server, dpo_job):
    created, job = dpo_job
    assert created.method.type == "dpo" and created.method.dpo.hyperparameters.beta == 0.2
    assert created.method.supervised is None
    assert job.status == "succeeded", job.error
    hyper = job.method.dpo.hyperparameters
    assert (hyper.beta, hyper.n_epochs, hyper.batch_size) == (0.2, 1, 4)
    assert hyper.learning_rate_multiplier == 1.0  # "auto", resolved as the job ran
    client = server.client()
    assert client.fine_tuning.jobs.retrieve(job.id).method.type == "dpo"
    assert {j.id: j.method.type for j in client.fine_tuning.jobs.list(limit=10)}[job.id] == "dpo"
    assert job.fine_tuned_model == f"ft:tiny:dpo:{job.id}"
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8,
                                           messages=[{"role": "user", "content": "name[Aromi], food[Chinese]"}])
    assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content, str)


def test_the_run_is_dpo_with_the_jobs_beta(server, dpo_job):
    """The same run() as any job, with train.objective=dpo and the beta asked for; its metrics have
    DPO's figures on every step and its evaluation the preference accuracy."""
    _, job = dpo_job
    job_dir = server.data_dir / "jobs" / job.id
    train = yaml.safe_load((job_dir / "config.yaml").read_text())["train"]
    assert (train["objective"], train["dpo_beta"], train["epochs"], train["batch_size"]) == ("dpo", 0.2, 1, 4)
    records = [json.loads(line) for line in (job_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 16 pairs / 4 per batch
    assert all(key in r for r in steps for key in RUN_FIGURES), steps[0]
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 for r in steps)
    report = json.loads((job_dir / "run" / "eval.json").read_text())
    assert 0.0 <= report["preference_accuracy"] <= 1.0


def test_events_checkpoints_and_result_file_carry_the_reward_accuracy(server, dpo_job):
    _, job = dpo_job
    client = server.client()
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in reversed(events) if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [1, 2, 3, 4]
    assert all("reward accuracy=" in e.message and 0 <= e.data["reward_accuracy"] <= 1 for e in metrics), metrics[0]
    assert metrics[-1].data.get("valid_loss") is not None  # the epoch's end is evaluated, on pairs
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert checkpoint.step_number == 4 and checkpoint.metrics.train_loss > 0
    assert 0 <= checkpoint.metrics.model_dump()["reward_accuracy"] <= 1
    (result,) = job.result_files
    rows = list(csv.DictReader(io.StringIO(client.files.content(result).text)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and "reward_accuracy" in rows[0]


# --- files that do not fit the method: 400 at creation ----------------------------------------------

@pytest.mark.parametrize("method,train,validation,param", [
    (DPO, "chat", None, "training_file"),
    (DPO, "pairs", "validation_chat", "validation_file"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}, "pairs", None, "training_file"),
    (None, "pairs", None, "training_file"),  # no method: supervised, as OpenAI's default
    ({"type": "supervised"}, "chat", "validation_pairs", "validation_file"),
], ids=["dpo-on-chat", "dpo-validated-on-chat", "supervised-on-pairs", "default-on-pairs",
        "supervised-validated-on-pairs"])
def test_files_that_do_not_fit_the_method_are_400(server, files, method, train, validation, param):
    client = server.client()
    before = [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    named = {"validation_file": files[validation].id} if validation else {}
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(model="tiny", training_file=files[train].id,
                                       **({"method": method} if method else {}), **named)
    error = raised.value
    assert error.status_code == 400 and error.param == param and error.code == f"invalid_{param}", error.body
    file = files[validation if param == "validation_file" else train]
    assert file.id in error.message and file.filename in error.message, error.message
    wanted = "holds no preference pairs" if (method or {}).get("type") == "dpo" else "holds preference pairs"
    assert wanted in error.message and "preferred_output" in error.message, error.message
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100)] == before  # no job was made


# --- bad method bodies: 400 naming the field ------------------------------------------------------------

@pytest.mark.parametrize("method,param", [
    ({"type": "ppo"}, "method.type"),
    ({"type": "reinforcement"}, "method.type"),
    ({"dpo": {"hyperparameters": {"beta": 0.1}}}, "method.type"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": -0.5}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "0.2"}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": True}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}, "method.dpo.hyperparameters.n_epochs"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}, "method.dpo.hyperparameters"),
    ({"type": "dpo", "dpo": "fast"}, "method.dpo"),
    ({"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}}, "method.dpo"),
    ({"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}}, "method.supervised"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}, "method.supervised.hyperparameters"),
    ({"type": "dpo", "hyperparameters": {"beta": 0.1}}, "method"),
], ids=lambda value: json.dumps(value) if isinstance(value, dict) else value)
def test_bad_method_bodies_are_400(server, files, method, param):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(model="tiny", training_file=files["pairs"].id, method=method)
    error = raised.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error", error.body
    assert set(error.body) == {"message", "type", "param", "code"}, error.body  # OpenAI's error object


def test_the_objective_is_the_methods_to_set(server, files):
    """feathertune's own options may not contradict the method: train.objective and dpo_beta are its."""
    client = server.client()
    for train in ({"objective": "dpo"}, {"dpo_beta": 0.3}):
        with pytest.raises(openai.BadRequestError) as raised:
            client.fine_tuning.jobs.create(model="tiny", training_file=files["pairs"].id, method=DPO,
                                           extra_body={"feathertune": {"train": train}})
        assert raised.value.param == "feathertune.train" and "method" in raised.value.message


def test_beta_auto_is_accepted_and_shown_as_asked(server, files):
    client = server.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=files["pairs"].id, method={"type": "dpo"},
                                         extra_body={"feathertune": FAST_OPTIONS})
    try:
        assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == "auto"
    finally:
        client.fine_tuning.jobs.cancel(job.id)
