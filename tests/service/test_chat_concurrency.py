"""Many adapters, one base: 32 chat requests at once over 4 fine-tuned adapters are batched
together (different adapters in one batch) and each answer equals what its adapter says alone."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from live import FAST_OPTIONS, wait_status, workspace_server

pytest.importorskip("openai")

PROMPTS = ["name[The Eagle], eatType[coffee shop]", "name[Aromi], food[Chinese]", "name[Zizzi], area[riverside]",
           "name[Cotto], priceRange[cheap]", "name[Alimentum], near[Yippee Noodle Bar]",
           "name[The Mill], customer rating[5 out of 5]", "name[Loch Fyne], familyFriendly[yes]",
           "name[Wildwood], food[Italian], area[city centre]"]


@pytest.fixture(scope="module")
def four_adapters(tmp_path_factory):
    with workspace_server(tmp_path_factory.mktemp("concurrency"), "--workers", "2") as server:
        client = server.client()
        train = client.files.create(file=(server.root / "train.jsonl").open("rb"), purpose="fine-tune")
        jobs = []
        for k in range(4):  # four different adapters: different seeds and learning rates
            options = {**FAST_OPTIONS, "train": {**FAST_OPTIONS["train"], "max_steps": 8, "lr": 1e-2 * (k + 1)}}
            jobs.append(client.fine_tuning.jobs.create(model="tiny", training_file=train.id, seed=k, suffix=f"a{k}",
                                                       extra_body={"feathertune": options}))
        models = [wait_status(client, j.id, {"succeeded", "failed"}).fine_tuned_model for j in jobs]
        assert all(models), "a fine-tuning job failed"
        yield server, models


def test_32_concurrent_requests_over_4_adapters_equal_their_answers_alone(four_adapters):
    server, models = four_adapters
    client = server.client()
    requests = [(models[i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(32)]

    def ask(request):
        model, prompt = request
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=16, temperature=0)
        return reply.choices[0].message.content

    ask(requests[0])  # load the base and an adapter before timing
    started = time.perf_counter()
    alone = [ask(r) for r in requests]
    one_at_a_time = time.perf_counter() - started
    with ThreadPoolExecutor(32) as pool:
        started = time.perf_counter()
        together = list(pool.map(ask, requests))
        concurrent = time.perf_counter() - started
    assert together == alone
    assert len({alone[i] for i in range(0, 32, 4)} | {alone[i] for i in range(1, 32, 4)}) > 1  # the adapters differ
    print(f"\n32 chat requests over 4 adapters: one at a time {32 / one_at_a_time:.1f} req/s, "
          f"32 at once {32 / concurrent:.1f} req/s ({one_at_a_time / concurrent:.2f}x)")
