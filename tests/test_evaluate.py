"""feathertune.evaluate: BLEU against sacrebleu, greedy generation against one-by-one decoding,
token-weighted loss against a hand computation, accuracy, and the samples file."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
from models import VOCAB, tiny_bert, tiny_llama

from feathertune.errors import ConfigError, DataError
from feathertune.evaluate import accuracy, bleu, generate, language_model_loss, write_samples

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]  # <|im_end|> is id 2, tiny llama's eos


def tiny_tokenizer():
    """An offline word-level tokenizer whose vocabulary covers every id the tiny model can emit."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["system", "user", "assistant"] + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - 3)]
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    assert len(vocab) == VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                        unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def sharp_llama():
    """tiny_llama with larger weights: at the default init its answers barely depend on the prompt,
    which would let a batching bug that mixes up answers go unnoticed."""
    model = tiny_llama()
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 0.3)
    return model


def conversations():
    lengths = [3, 9, 1, 6, 4]  # different prompt lengths, so the batches need padding and sorting
    return [[{"role": "system", "content": "w0 w1"},
             {"role": "user", "content": " ".join(f"w{(7 * n + k) % 80}" for k in range(length))}]
            for n, length in enumerate(lengths)]


# --- bleu -------------------------------------------------------------------------------------


def test_bleu_identical_is_100_and_disjoint_is_0():
    sentences = ["the cat sat on the mat", "a quick brown fox jumps over it"]
    assert bleu(sentences, [[s] for s in sentences]) == pytest.approx(100.0)
    assert bleu(sentences, [["zebra yak"], ["quux plugh xyzzy"]]) == pytest.approx(0.0, abs=1e-9)


def test_bleu_matches_sacrebleu_with_two_references():
    hyps = ["the cat is on the mat", "there is a dog in the garden"]
    refs = [["the cat sat on the mat", "a cat is on the mat"],
            ["a dog is in the garden", "there is a dog outside"]]
    expected = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs], [r[1] for r in refs]]).score
    assert bleu(hyps, refs) == pytest.approx(expected)
    assert 0 < expected < 100


def test_bleu_handles_variable_reference_counts():
    # Repeating a reference changes nothing in BLEU (clipped counts and closest length are maxima
    # and minima), so an item with one reference scores as if that reference were given twice.
    hyps = ["the cat is on the mat", "there is a dog in the garden", "hello world"]
    refs = [["the cat sat on the mat"], ["a dog is in the garden", "there is a dog outside"],
            ["hello there world", "hello world !", "hi world"]]
    padded = [r + [r[0]] * (3 - len(r)) for r in refs]
    expected = sacrebleu.corpus_bleu(hyps, [list(stream) for stream in zip(*padded)]).score
    assert bleu(hyps, refs) == pytest.approx(expected)


def test_bleu_errors_name_the_problem():
    with pytest.raises(ConfigError, match="2 hypotheses but 1 reference"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ConfigError, match=r"references\[1\] is empty"):
        bleu(["a", "b"], [["a"], []])
    with pytest.raises(ConfigError, match="wrap it in a list"):
        bleu(["a"], ["a"])


# --- generate ---------------------------------------------------------------------------------


def test_generate_batched_equals_one_by_one_in_input_order():
    model, tokenizer = sharp_llama(), tiny_tokenizer()
    convs = conversations()
    batched = generate(model, tokenizer, convs, max_new_tokens=6, batch_size=2, progress=False)
    single = [generate(model, tokenizer, [c], max_new_tokens=6, batch_size=1, progress=False)[0]
              for c in convs]
    assert batched == single
    assert len(set(batched)) == len(convs)  # distinct answers, so the order is checked


def test_generate_returns_greedy_new_text_only():
    model, tokenizer = sharp_llama(), tiny_tokenizer()
    conv = conversations()[1]
    prompt = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = []
    with torch.no_grad():  # greedy by hand: append the argmax token, no cache
        for _ in range(5):
            next_id = model(ids).logits[0, -1].argmax()
            if next_id.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            expected.append(next_id.item())
    answer = generate(model, tokenizer, [conv], max_new_tokens=5, progress=False)[0]
    assert answer == tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_generate_stops_at_eos():
    """Force eos at the third decoding step: the answer is the first two greedy tokens, nothing after."""
    model, tokenizer = sharp_llama(), tiny_tokenizer()
    convs = conversations()
    two_tokens = generate(model, tokenizer, convs, max_new_tokens=2, batch_size=8, progress=False)
    calls = []

    def force_eos_at_step_3(module, args, logits):  # lm_head runs once per decoding step
        calls.append(1)
        if len(calls) == 3:
            logits = logits.clone()
            logits[..., tokenizer.eos_token_id] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(force_eos_at_step_3)
    try:
        answers = generate(model, tokenizer, convs, max_new_tokens=10, batch_size=8, progress=False)
    finally:
        handle.remove()
    assert answers == two_tokens
    assert len(calls) == 3  # generation ended when every sequence hit eos


def test_generate_restores_padding_side_and_training_mode():
    model, tokenizer = sharp_llama(), tiny_tokenizer()
    tokenizer.padding_side = "right"
    model.train()
    model.model.layers[0].eval()  # a part deliberately left in eval mode stays so
    generate(model, tokenizer, conversations()[:2], max_new_tokens=2, progress=False)
    assert tokenizer.padding_side == "right"
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training


def test_generate_restores_state_on_error_and_borrows_eos_as_pad():
    model, tokenizer = sharp_llama(), tiny_tokenizer()
    tokenizer.pad_token = None
    model.train()

    def broken_generate(**kwargs):
        assert tokenizer.padding_side == "left" and not model.training
        assert kwargs["pad_token_id"] == tokenizer.eos_token_id
        raise RuntimeError("out of memory")

    model.generate = broken_generate
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(model, tokenizer, conversations(), max_new_tokens=2, progress=False)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None and model.training


def test_generate_rejects_bad_arguments():
    model, tokenizer = sharp_llama(), tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError) as err:
        generate(model, tokenizer, conversations(), batch_size=0, progress=False)
    assert "batch_size=0" in str(err.value) and "chat_template" in str(err.value)
    assert generate(model, tiny_tokenizer(), [], progress=False) == []


# --- language_model_loss / accuracy -----------------------------------------------------------


def lm_batches():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(4, VOCAB, (2, 7), generator=g)
    b = torch.randint(4, VOCAB, (3, 5), generator=g)
    mask_a = torch.ones_like(a)
    mask_a[1, :2] = 0  # left padding in the second row
    labels_a = a.clone()
    labels_a[:, :3] = -100  # a prompt that is not supervised
    labels_b = b.clone()
    labels_b[0, :4] = -100
    return [{"input_ids": a, "attention_mask": mask_a, "labels": labels_a},
            {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": labels_b}]


def test_language_model_loss_is_token_weighted_cross_entropy():
    model = tiny_llama()
    batches = lm_batches()
    nll, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            batch_nll, batch_count = 0.0, 0
            for row in range(logits.shape[0]):  # token t+1 is predicted from position t
                for t in range(logits.shape[1] - 1):
                    target = batch["labels"][row, t + 1].item()
                    if target != -100:
                        batch_nll -= log_probs[row, t, target].item()
                        batch_count += 1
            nll, count = nll + batch_nll, count + batch_count
            batch_means.append(batch_nll / batch_count)
    result = language_model_loss(model, batches)
    assert result["tokens"] == count == 2 * 4 + (1 + 2 * 4)
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert abs(result["loss"] - sum(batch_means) / 2) > 1e-4  # not a mean of batch means


def test_language_model_loss_matches_hf_on_one_batch_and_restores_mode():
    model = tiny_llama().train()
    batch = lm_batches()[0]
    with torch.no_grad():
        model.eval()
        expected = model(**batch).loss.item()
        model.train()
    assert language_model_loss(model, [batch])["loss"] == pytest.approx(expected, rel=1e-5)
    assert model.training


def test_language_model_loss_without_supervised_tokens_is_an_error():
    batch = lm_batches()[1]
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(DataError, match="no supervised tokens"):
        language_model_loss(tiny_llama(), [batch])


def test_accuracy_counts_examples_over_batches():
    model = tiny_bert(num_labels=3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (5, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 4:] = 0
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    labels = predicted.clone()
    labels[[1, 4]] = (predicted[[1, 4]] + 1) % 3  # two of five wrong
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2], "labels": labels[:2]},
               {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": labels[2:]}]
    model.train()  # dropout must be off while evaluating, and training mode back after
    assert accuracy(model, batches) == pytest.approx(3 / 5)
    assert model.training
    with pytest.raises(DataError, match="no examples"):
        accuracy(model, [])


# --- write_samples ----------------------------------------------------------------------------


def test_write_samples_shows_every_field(tmp_path):
    rows = [{"prompt": "Translate: bonjour", "reference": "hello", "base": "bonjour?", "tuned": "hello!"},
            {"prompt": [{"role": "user", "content": "say ```code```"}], "reference": "ok",
             "base": "", "tuned": "fine"}]
    path = tmp_path / "out" / "samples.md"
    write_samples(path, rows)
    text = path.read_text()
    for value in ["Translate: bonjour", "hello", "bonjour?", "hello!", "user: say ```code```", "fine"]:
        assert value in text
    assert text.index("Base model") < text.index("Fine-tuned") < text.index("Reference")
    assert text.count("## Example") == 2
    assert "````text" in text  # the fence outgrows the backticks in the prompt
    assert [p.name for p in path.parent.iterdir()] == ["samples.md"]  # no temporary left behind


def test_write_samples_lists_missing_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"rows\[1\] lacks 'base', 'tuned'"):
        write_samples(tmp_path / "s.md", [{"prompt": "p", "reference": "r", "base": "b", "tuned": "t"},
                                          {"prompt": "p", "reference": "r"}])
