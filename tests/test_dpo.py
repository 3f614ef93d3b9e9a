"""DPO (train.objective: dpo) on preference pairs: the data format, the loss against its formula in
float64 and against TRL's DPOTrainer, the reference being the base without a second copy of it, and
the pipeline end to end on a tiny chat model."""

from __future__ import annotations

import gc
import json
import math
import warnings

import pytest
import torch
from runs import make_workspace, write_config

import feathertune as ft
from feathertune.cli import main as cli
from feathertune.data import collate, read_examples, tokenize_examples
from feathertune.errors import ConfigError, DataError
from feathertune.loss import sequence_logps
from feathertune.models import load_model
from feathertune.train.dpo import BASE_LOSS, dpo_loss_sum, dpo_losses, reference_logps, validation_scores

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROMPT = "Write a one-sentence description of the restaurant from this meaning representation: "


def pair(mr: str, good: str, bad: str, history: list[dict] | None = None) -> dict:
    return {"input": {"messages": [*(history or []), {"role": "user", "content": PROMPT + mr}]},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def e2e_pairs(count: int) -> list[dict]:
    """Pairs from the E2E chat slice: the human reference for the MR, and the same words in reverse
    order: as long, so an untrained model ranks them near chance; DPO must learn which reads right."""
    lines = [json.loads(line) for line in (ft_data() / "train.jsonl").read_text().splitlines()[:count]]
    pairs = []
    for line in lines:
        answer = line["messages"][1]["content"]
        pairs.append(pair(line["messages"][0]["content"].removeprefix(PROMPT), answer, " ".join(answer.split()[::-1])))
    return pairs


def ft_data():
    from runs import E2E

    return E2E


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny chat model with its tokenizer, and a workspace holding preference files."""
    root, config = make_workspace(tmp_path_factory.mktemp("dpo"))
    pairs = e2e_pairs(24)
    train = write_jsonl(root / "pairs.jsonl", pairs)
    validation = write_jsonl(root / "pairs-val.jsonl", pairs[:8])
    config = {**config, "data": {**config["data"], "train": train, "validation": validation},
              "train": {**config["train"], "objective": "dpo", "checkpoint_every": 0}}
    return root, config


# --- data ---------------------------------------------------------------------------------------

def test_preference_pairs_are_read_and_recognised(tmp_path):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = write_jsonl(tmp_path / "p.jsonl", [pair("name[A]", "A is a pub.", "B is a pub.", history)])
    examples = read_examples(path)
    assert examples.kind == examples.format == "preference"
    (example,) = examples.items
    assert example.messages[-1] == {"role": "assistant", "content": "A is a pub."}
    assert example.rejected[-1] == {"role": "assistant", "content": "B is a pub."}
    assert example.messages[:-1] == example.rejected[:-1]
    assert example.messages[1] == {"role": "assistant", "content": "Hello!", "weight": 0}  # context, not learned
    assert examples.conversations() == [[history[0], history[1], example.messages[2]]]


def test_broken_preference_lines_are_all_reported_by_line_and_field(tmp_path):
    good = pair("name[A]", "A is a pub.", "B is a pub.")
    no_preferred = {k: v for k, v in good.items() if k != "preferred_output"}
    wrong_role = {**good, "non_preferred_output": [{"role": "user", "content": "B is a pub."}]}
    empty = {**good, "preferred_output": [{"role": "assistant", "content": "  "}]}
    same = {**good, "non_preferred_output": good["preferred_output"]}
    two = {**good, "preferred_output": good["preferred_output"] * 2}
    ends_with_answer = {**good, "input": {"messages": [{"role": "assistant", "content": "Hi"}]}}
    no_input = {k: v for k, v in good.items() if k != "input"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "{not json", no_preferred, wrong_role, empty, same, two,
                                                ends_with_answer, no_input])
    with pytest.raises(DataError) as caught:
        read_examples(path)
    text = str(caught.value)
    for expected in (":2: json: not valid JSON", ":3: preferred_output: missing",
                     ":4: non_preferred_output[0].role: 'user'", ":5: preferred_output[0].content: is empty",
                     ":6: non_preferred_output: is the same text", ":7: preferred_output: expected a list holding one",
                     ":8: input.messages[0].role: the conversation ends with an assistant message",
                     ":9: input: missing"):
        assert f"{path}{expected}" in text, (expected, text)


def test_broken_preference_file_stops_the_cli_with_exit_code_2_and_no_traceback(tiny, tmp_path, capsys):
    root, config = tiny
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair("name[A]", "A", "B"), {"input": {"messages": []}}])
    cfg = write_config(root, config, "dpo-bad", data={**config["data"], "train": bad})
    assert cli(["train", str(cfg), f"output={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: input.messages: is empty" in err and f"{bad}:2: preferred_output: missing" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_pair_tokenizes_to_two_rows_sharing_the_prompt_with_only_the_answers_supervised(tiny):
    root, _ = tiny
    _, tokenizer = load_model(str(root / "model"))
    examples = read_examples(root / "pairs.jsonl")
    rows = tokenize_examples(examples, tokenizer, max_length=256).rows
    row = rows[0]
    chosen = [t for t in row["labels"] if t != -100]
    rejected = [t for t in row["rejected_labels"] if t != -100]
    start = next(i for i, t in enumerate(row["labels"]) if t != -100)
    assert row["input_ids"][:start] == row["rejected_input_ids"][:start]  # the prompt, unsupervised
    assert tokenizer.decode(chosen).startswith(examples.items[0].messages[-1]["content"])
    assert tokenizer.decode(rejected).startswith(examples.items[0].rejected[-1]["content"])
    batch = collate(rows[:3], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6  # the 3 preferred answers, then the 3 others
    assert batch["labels"][4].tolist()[: len(rows[1]["rejected_labels"])] == rows[1]["rejected_labels"]


# --- the loss -----------------------------------------------------------------------------------

def test_dpo_losses_are_equation_7_in_float64():
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=generator, dtype=torch.float64) * 20 for _ in range(4))
    beta = 0.3
    losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta)
    for i in range(16):
        margin = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert math.isclose(losses[i].item(), math.log1p(math.exp(-margin)), rel_tol=1e-12)
    assert torch.equal(chosen, beta * (pc - rc)) and torch.equal(rejected, beta * (pr - rr))


def test_sequence_logps_sum_the_answer_tokens_log_probabilities():
    from models import tiny_llama

    model = tiny_llama().double()
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 7:] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        logits = model(input_ids=ids).logits.log_softmax(-1)
    expected = [sum(logits[b, t - 1, ids[b, t]].item() for t in range(9) if labels[b, t] != -100) for b in range(3)]
    for sparse in (True, False):
        got = sequence_logps(model, inputs, sparse_head=sparse).tolist()
        assert all(math.isclose(g, e, rel_tol=1e-10) for g, e in zip(got, expected)), (sparse, got, expected)


@pytest.mark.parametrize("exact_head", [True, False], ids=["float64", "trl-fused-head"])
def test_dpo_loss_and_gradients_equal_trls_dpo_trainer(tiny, tmp_path, exact_head):
    """TRL's DPOTrainer (PEFT LoRA, the adapter disabled for the reference) and feathertune on the same
    batch — TRL's own, tokenized by it — the same LoRA weights and β: the loss and every gradient.

    TRL computes the answers' token log-probabilities with a fused, chunked output head that works in
    float32 whatever the model's dtype (trl/kernels/chunked_logprob.py). So the comparison is made
    twice: in float64 with that head replaced by the textbook one (log_softmax of the full logits,
    in the test, not feathertune's code), where both sides are exact and every gradient agrees to
    1e-5 (measured: 9e-16); and with TRL untouched in float32, where its head's rounding can show in
    the smallest tensors' gradients (measured: 3.4e-6 at worst on this batch, 3.8e-5 on another
    one), so that case allows 1e-4."""
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    root, _ = tiny
    model_dir, beta = str(root / "model"), 0.2
    dtype = torch.float64 if exact_head else torch.float32
    _, tokenizer = load_model(model_dir)
    rows = [{"prompt": p["input"]["messages"], "chosen": p["preferred_output"], "rejected": p["non_preferred_output"]}
            for p in e2e_pairs(4)]
    config = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=beta,
                           report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
                           dataloader_num_workers=0, max_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A new adapter (peft_config), so TRL's reference is the base with it disabled. (Given a PeftModel,
        # TRL keeps a copy of its adapter as the reference: DPO continuing from a trained adapter.)
        trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                                 args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                 peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules="all-linear", init_lora_weights=False))
    if exact_head:
        textbook_head(trainer.model.get_base_model())
    reference = trainer.model  # random B (init_lora_weights=False): the policy is not the base, gradients not zero
    reference.save_pretrained(str(tmp_path / "adapter"))
    batch = next(iter(trainer.get_train_dataloader()))
    reference.train()
    trl_loss = trainer.compute_loss(reference, batch)
    trl_loss.backward()
    trl_grads = {n.replace(".default", ""): p.grad for n, p in reference.named_parameters() if p.requires_grad}

    ours = ft.load_adapter(load_model(model_dir)[0].to(dtype), str(tmp_path / "adapter"), trainable=True).train()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    summed, stats = dpo_loss_sum(ours, inputs, beta)
    loss = summed / (labels.shape[0] // 2)
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) <= 1e-5 * abs(trl_loss.item()), (loss.item(), trl_loss.item())
    assert abs(loss.item() - math.log(2)) > 1e-3  # the policy is not the reference
    ours_grads = dict(named_adapter_grads(ours))
    assert ours_grads.keys() == trl_grads.keys() and len(ours_grads) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    tolerance = 1e-5 if exact_head else 1e-4
    for name, grad in ours_grads.items():
        assert grad.abs().max() > 0, name
        gap = (grad - trl_grads[name]).norm() / trl_grads[name].norm()
        assert gap <= tolerance, (name, gap.item())
    assert 0 <= stats["reward_accuracy"] <= 4


def textbook_head(model) -> None:
    """Replace TRL's fused head (its `fused_lm_head=True` forward) by the plain computation in the
    model's own dtype: the token log-probabilities from log_softmax over the full logits."""
    import types

    forward = type(model).forward

    def exact(self, *args, labels=None, fused_lm_head=False, **kwargs):
        out = forward(self, *args, **kwargs)
        if not fused_lm_head:
            return out
        shifted = labels[:, 1:]
        token_logps = out.logits[:, :-1].log_softmax(-1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        zeros = torch.zeros_like(token_logps)  # the rest feed TRL's logged metrics only
        return types.SimpleNamespace(log_probs=token_logps.masked_fill(shifted == -100, 0), entropy=zeros,
                                     mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None, loss=None)

    model.forward = types.MethodType(exact, model)


def named_adapter_grads(model):
    """Gradients under PEFT's names: <path>.lora.default.A → base_model.model.<path>.lora_A.weight."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            path, matrix = name.rsplit(".lora.default.", 1)
            yield f"base_model.model.{path}.lora_{matrix}.weight", param.grad


# --- the reference is the base, held once ---------------------------------------------------------

def test_the_reference_is_the_base_with_the_adapter_disabled(tiny):
    root, _ = tiny
    model_dir = str(root / "model")
    _, tokenizer = load_model(model_dir)
    rows = tokenize_examples(read_examples(root / "pairs.jsonl"), tokenizer, 256).rows[:4]
    inputs = collate(rows, tokenizer.pad_token_id)
    base = load_model(model_dir)[0].eval()
    with torch.no_grad():
        expected = sequence_logps(base, inputs)
    model = ft.attach(load_model(model_dir)[0], ft.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.normal_(0, 0.5)  # far from the base: the policy's log-probabilities differ from the reference's
        policy = sequence_logps(model.eval(), inputs)
    model.train()
    assert torch.allclose(reference_logps(model, inputs), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(policy, expected, atol=1e-2)
    assert model.training  # reference_logps switched to eval mode for the reference, and back


def test_dpo_holds_no_second_copy_of_the_base(tiny):
    """No parameter comes to life during a DPO step (the policy's forward, the reference's, the
    backward): the reference costs no copy of the base. Live parameters are found with gc, by storage,
    before the step and inside each forward."""
    root, _ = tiny
    model_dir = str(root / "model")
    model, tokenizer = load_model(model_dir)
    model = ft.attach(model, ft.LoraConfig(r=4, alpha=8, target_modules="all-linear")).train()
    inputs = collate(tokenize_examples(read_examples(root / "pairs.jsonl"), tokenizer, 256).rows[:4],
                     tokenizer.pad_token_id)

    def live_parameters() -> set[int]:
        gc.collect()
        return {obj.untyped_storage().data_ptr() for obj in gc.get_objects() if isinstance(obj, torch.nn.Parameter)}

    before = live_parameters()  # the model's, and whatever other tests left alive in this process
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} <= before
    from feathertune.train import dpo

    original, seen, calls = dpo.sequence_logps, set(), []

    def counting(model_, inputs_, **options):  # looks around during the reference's forward too
        calls.append(torch.is_grad_enabled())
        seen.update(live_parameters())
        return original(model_, inputs_, **options)

    dpo.sequence_logps = counting
    try:
        summed, _ = dpo_loss_sum(model, inputs, 0.1)
        summed.backward()
    finally:
        dpo.sequence_logps = original
    assert calls == [True, False]  # the policy with gradients, then the reference without
    assert seen | live_parameters() <= before, "a parameter came to life during the step: a copy of the base?"


# --- the pipeline -------------------------------------------------------------------------------

def test_a_dpo_run_writes_its_figures_and_raises_preference_accuracy(tiny, tmp_path):
    root, config = tiny
    out = tmp_path / "run"
    cfg = write_config(root, config, "dpo", train={**config["train"], "max_steps": 12, "lr": 2e-2, "eval_every": 6,
                                                   "dpo_beta": 0.5},
                       data={**config["data"], "validation": str(root / "pairs.jsonl")})
    assert cli(["train", str(cfg), f"output={out}"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 12
    for key in ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert all(0 <= r["reward_accuracy"] <= 1 for r in steps)
    assert math.isclose(steps[0]["loss"], math.log(2), rel_tol=1e-4)  # the adapter starts as the base: π = π_ref
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert math.isclose(evals[0], math.log(2), rel_tol=1e-4) and evals[-1] < evals[0]
    scores = json.loads((out / "eval.json").read_text())
    assert scores["preference_accuracy"] > scores["base_preference_accuracy"]
    assert scores["preference_accuracy"] >= 0.9, scores
    from matplotlib.image import imread

    assert imread(out / "loss.png").shape[0] == 900  # a second panel, for the rewards (7.5 in at 120 dpi)
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_validation_scores_count_the_pairs_each_model_ranks_right_in_one_pass(tiny):
    root, _ = tiny
    model_dir = str(root / "model")
    base, tokenizer = load_model(model_dir)
    rows = tokenize_examples(read_examples(root / "pairs.jsonl"), tokenizer, 256).rows[:6]
    batches = [collate(rows[:4], tokenizer.pad_token_id), collate(rows[4:], tokenizer.pad_token_id)]
    model = ft.attach(load_model(model_dir)[0], ft.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.normal_(0, 0.3)

    def ranked_right(m) -> int:
        with torch.no_grad():
            logps = [sequence_logps(m.eval(), b) for b in batches]
        return sum(int((lp[: len(lp) // 2] > lp[len(lp) // 2:]).sum()) for lp in logps)

    scores = validation_scores(model.train(), batches, beta=0.1)
    assert model.training
    assert scores["preference_accuracy"] == ranked_right(model) / 6
    assert scores["base_preference_accuracy"] == ranked_right(base) / 6  # the reference's ranking is the base's
    assert scores["base_eval_loss"] == BASE_LOSS == math.log(2) and scores["eval_loss"] != BASE_LOSS


def test_dpo_needs_preference_data_and_preference_data_needs_dpo(tiny, tmp_path):
    root, config = tiny
    chat = {**config["data"], "train": str(root / "train.jsonl"), "validation": str(root / "validation.jsonl")}
    with pytest.raises(ConfigError, match="train.objective=dpo learns from preference pairs"):
        ft.run(ft.TrainConfig.from_dict({**config, "data": chat, "output": str(tmp_path / "a")}))
    sft = {**config["train"], "objective": "sft"}
    with pytest.raises(ConfigError, match="set train.objective=dpo"):
        ft.run(ft.TrainConfig.from_dict({**config, "train": sft, "output": str(tmp_path / "b")}))
    mixed = {**config["data"], "train": str(root / "train.jsonl")}  # chat training data, pairs for validation
    with pytest.raises(ConfigError, match="validation file .* holds preference pairs"):
        ft.run(ft.TrainConfig.from_dict({**config, "data": mixed, "train": sft, "output": str(tmp_path / "d")}))
    with pytest.raises(ConfigError, match="train.dpo_beta=0"):
        ft.run(ft.TrainConfig.from_dict({**config, "train": {**config["train"], "dpo_beta": 0},
                                         "output": str(tmp_path / "c")}))
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_full_fine_tuning_dpo_warns_that_the_base_is_held_twice(tiny, tmp_path):
    root, config = tiny
    lines = []
    cfg = {k: v for k, v in config.items() if k != "lora"}
    cfg = ft.TrainConfig.from_dict({**cfg, "method": "full", "output": str(tmp_path / "full"),
                                    "train": {**config["train"], "max_steps": 2, "lr": 1e-4}})
    ft.run(cfg, log=lines.append)
    assert any("DPO's reference is the base" in line and "twice" in line for line in lines), lines


def test_feathertune_eval_scores_preference_pairs(tiny, tmp_path):
    """`feathertune eval` on a pairs file: preference accuracy with and without the adapter, and the
    DPO loss against the base (log 2 for the base itself)."""
    from feathertune.train.report import evaluate_run

    root, config = tiny
    out = tmp_path / "run"
    cfg = write_config(root, config, "dpo-eval", train={**config["train"], "max_steps": 8, "lr": 2e-2})
    assert cli(["train", str(cfg), f"output={out}"]) == 0
    tuned = json.loads((out / "eval.json").read_text())
    scores = evaluate_run(str(root / "model"), out / "adapter", data=str(root / "pairs-val.jsonl"), max_length=256)
    assert scores["preference_accuracy"] == tuned["preference_accuracy"]
    assert scores["base_preference_accuracy"] == tuned["base_preference_accuracy"]
    assert scores["base_eval_loss"] == BASE_LOSS and scores["loss"] < BASE_LOSS
