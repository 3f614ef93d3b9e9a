"""Data: every format parses, every bad line is reported with path, line and field in one error,
the loss falls exactly on the assistant's tokens and end-of-turn, and batches are deterministic.

Chat tokenizers are built here, offline (a byte-level BPE with a ChatML or Llama-3-like template);
the real SmolLM2 tokenizer is used too when a local copy exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from feathertune.data import Examples, batch_indices, collate, read_examples, tokenize_examples
from feathertune.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DATA_ROOTS = [REPO / "data", REPO.parent / "shared" / "data"]
SMOLLM2_PATHS = [Path.home() / ".cache/feathertune/models/smollm2-135m-instruct", Path("/tmp/smol")]

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Rewrites earlier assistant turns (as reasoning templates do), so prefixes are not prefixes.
REWRITING = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>"
             "assistant\n...<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
             "'<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
             "{% endif %}")
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["hello there, how are you today?", "the quick brown fox jumps over the lazy dog",
          "write a sentence about the restaurant", "The Eagle is a cheap coffee shop near Burger King."]


def chat_tokenizer(template: str = CHATML, eos: str = "<|im_end|>"):
    """A small byte-level BPE tokenizer (any text round-trips through decode) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token="<pad>",
                                        additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return chat_tokenizer()


def write_jsonl(path: Path, lines: list) -> str:
    """Each item a dict (written as JSON) or a str (written as is, e.g. broken JSON or '')."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def chat(*turns, **extra) -> dict:
    """chat(("user", "hi"), ("assistant", "hello")) -> {"messages": [...]}."""
    return {"messages": [{"role": r, "content": c, **extra.get(f"m{i}", {})} for i, (r, c) in enumerate(turns)]}


def supervised_spans(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive tokens that carry a loss."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    return [tokenizer.decode(span) for span in spans]


GOOD = chat(("user", "hi"), ("assistant", "hello there"))


# --- formats ------------------------------------------------------------------------------------

def test_chat_parses_and_keeps_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", chat(("system", "be brief"), ("user", "a"),
                                                                 ("assistant", "b"), ("user", "c"), ("assistant", "d"))])
    examples = read_examples(path)
    assert (examples.kind, examples.format, len(examples)) == ("chat", "chat", 2)
    assert [ex.line for ex in examples.items] == [1, 3]
    assert examples.conversations()[1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert examples.references() == [["hello there"], ["d"]]


@pytest.mark.parametrize("record, format, user, assistant", [
    ({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", "Sum\n\n1 2", "3"),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", "Say hi", "hi"),
    ({"instruction": "Say hi", "output": "hi"}, "alpaca", "Say hi", "hi"),
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", "2+2=", "4"),
    ({"prompt": "Describe", "references": ["one", "two"]}, "references", "Describe", "one"),
])
def test_converted_chat_formats(tmp_path, record, format, user, assistant):
    for given in ("auto", format):
        examples = read_examples(write_jsonl(tmp_path / "d.jsonl", [record]), format=given)
        assert (examples.kind, examples.format) == ("chat", format)
        assert examples.items[0].messages == [{"role": "user", "content": user},
                                              {"role": "assistant", "content": assistant}]
    assert examples.references() == [record.get("references", [assistant])]


def test_line_separators_inside_json_strings_do_not_split_lines(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [chat(("user", "a\u2028b\x85c"), ("assistant", "d")), GOOD])
    path_text = Path(path).read_text()
    Path(path).write_text(path_text.replace("\\u2028", "\u2028").replace("\\u0085", "\x85"))  # raw, as JSON allows
    examples = read_examples(path)
    assert [ex.line for ex in examples.items] == [1, 2]
    assert examples.items[0].messages[0]["content"] == "a\u2028b\x85c"


def test_text_from_txt_paragraphs_and_jsonl(tmp_path):
    (tmp_path / "book.txt").write_text("First paragraph\nstill first.\n\n\n  Second.  \n\nThird.")
    examples = read_examples(tmp_path / "book.txt")
    assert (examples.kind, examples.format) == ("text", "text")
    assert [(ex.line, ex.text) for ex in examples.items] == [(1, "First paragraph\nstill first."), (5, "Second."),
                                                             (7, "Third.")]
    examples = read_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"text": "c"}]))
    assert (examples.kind, [ex.text for ex in examples.items]) == ("text", ["a b", "c"])
    examples = read_examples(write_jsonl(tmp_path / "t.jsonl", [{"body": "x"}]), text_field="body")
    assert examples.items[0].text == "x"


def test_classification_from_tsv_csv_and_jsonl(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nfine film \t1\nbad \t0\n")
    examples = read_examples(tmp_path / "a.tsv")  # `sentence` stands in for the default text_field
    assert (examples.kind, examples.label_names) == ("classification", ["0", "1"])
    assert [(ex.line, ex.text, ex.label) for ex in examples.items] == [(2, "fine film", 1), (3, "bad", 0)]
    (tmp_path / "b.csv").write_text('review,stars\n"good, really",10\n"multi\nline",2\nok,1\n')
    examples = read_examples(tmp_path / "b.csv", text_field="review", label_field="stars")
    assert examples.label_names == ["1", "2", "10"]  # numeric, not alphabetical
    assert [(ex.line, ex.text, ex.label) for ex in examples.items] == [(2, "good, really", 2), (3, "multi\nline", 1),
                                                                     (5, "ok", 0)]
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    assert read_examples(path).label_names == ["neg", "pos"]
    examples = read_examples(path, label_names=["pos", "neg"])
    assert [ex.label for ex in examples.items] == [0, 1]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": "0"}])
    assert [ex.label for ex in read_examples(path).items] == [1, 0]  # 1 and "1" are one label


def test_auto_that_cannot_decide_names_keys_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", ["not json", {"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as excinfo:
        read_examples(path)
    message = str(excinfo.value)
    assert f"{path}:2: keys: found answer, question" in message
    assert "chat (messages)" in message and "alpaca (instruction, output)" in message and "format=" in message


# --- every problem, with path, line and field ---------------------------------------------------

BROKEN = {
    "bad JSON": ('{"messages": [}', "json", "not valid JSON"),
    "not an object": ('["user", "hi"]', "json", "got a list"),
    "missing messages": ({"msgs": []}, "messages", "missing"),
    "wrong role": (chat(("user", "hi"), ("asistant", "yo")), "messages[1].role",
                   "'asistant' is not one of system, user, assistant, tool (did you mean 'assistant'?)"),
    "empty content": (chat(("user", "  "), ("assistant", "yo")), "messages[0].content", "is empty"),
    "content not a string": (chat(("user", "hi"), ("assistant", "yo"), m1={"content": ["yo"]}),
                             "messages[1].content", "expected a string, got a list"),
    "no assistant turn": (chat(("system", "s"), ("user", "hi")), "messages", "no assistant message"),
    "weight 2": (chat(("user", "hi"), ("assistant", "yo"), m1={"weight": 2}), "messages[1].weight", "2 is not 0 or 1"),
    "weight on user": (chat(("user", "hi"), ("assistant", "yo"), m0={"weight": 0}), "messages[0].weight",
                       "only assistant messages"),
    "all weights 0": (chat(("user", "hi"), ("assistant", "yo"), m1={"weight": 0}), "messages", "weight 0"),
    "alpaca without output": ({"instruction": "x", "output": ""}, "output", "is empty"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_line_names_path_line_and_field(tmp_path, case):
    line, field, what = BROKEN[case]
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD if "alpaca" not in case else {"instruction": "i", "output": "o"},
                                                  "", line, GOOD])
    with pytest.raises(DataError) as excinfo:
        read_examples(path)
    assert f"{path}:3: {field}: " in str(excinfo.value)
    assert what in str(excinfo.value)
    assert excinfo.value.problems[0].startswith(f"{path}:3: {field}: ")


def test_label_outside_label_names(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nodd\t2\n\t0\n")
    with pytest.raises(DataError) as excinfo:
        read_examples(tmp_path / "dev.tsv", label_names=["0", "1"])
    assert excinfo.value.problems == [
        f"{tmp_path / 'dev.tsv'}:3: label: '2' is not one of the labels 0, 1 (label_names); "
        "fix the label, or add it to label_names",
        f"{tmp_path / 'dev.tsv'}:4: sentence: is empty; write the text, or drop the example"]


def test_missing_column_is_reported_once_at_the_header(tmp_path):
    (tmp_path / "x.csv").write_text("review,stars\na,1\nb,0\n")
    with pytest.raises(DataError) as excinfo:
        read_examples(tmp_path / "x.csv")
    assert len(excinfo.value.problems) == 2
    assert "x.csv:1: header: has no column 'label'; the columns are review, stars; pass label_field=" \
        in str(excinfo.value)


def test_every_broken_line_in_one_error_capped_but_counted(tmp_path):
    lines = [GOOD] + [line for line, _, _ in BROKEN.values() if not isinstance(line, dict) or "messages" in line]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as excinfo:
        read_examples(path)
    problems = excinfo.value.problems
    assert [int(p.split(":")[1]) for p in problems] == list(range(2, len(lines) + 1))
    with pytest.raises(DataError) as excinfo:
        read_examples(path, max_problems=3)
    assert len(excinfo.value.problems) == 3
    assert f"{len(problems)} problems" in str(excinfo.value) and f"and {len(problems) - 3} more" in str(excinfo.value)


def test_missing_empty_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_examples(tmp_path / "nope.jsonl")
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("head.tsv", "sentence\tlabel\n"),
                          ("empty.txt", "\n\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match="no examples"):
            read_examples(tmp_path / name)
    with pytest.raises(ConfigError, match="format='chatml' is not one of auto, chat"):
        read_examples(tmp_path / "empty.jsonl", format="chatml")


def test_chat_only_methods_refuse_other_kinds(tmp_path):
    examples = Examples("text", [], "t.txt", "text")
    with pytest.raises(DataError, match="needs chat examples"):
        examples.conversations()


# --- tokenization -------------------------------------------------------------------------------

def chat_examples(*records) -> Examples:
    from feathertune.data.formats import Example
    return Examples("chat", [Example(i + 1, messages=r["messages"]) for i, r in enumerate(records)], "mem.jsonl",
                    "chat")


def test_labels_are_exactly_assistant_content_and_end_of_turn(chatml):
    record = chat(("system", "be brief"), ("user", "hello there"), ("assistant", "the quick brown fox"),
                  ("user", "how are you?"), ("assistant", "write a sentence"), ("user", "today?"),
                  ("assistant", "The Eagle is cheap."), m4={"weight": 0})
    tokenized = tokenize_examples(chat_examples(record), chatml, max_length=1000)
    row = tokenized.rows[0]
    assert supervised_spans(chatml, row) == ["the quick brown fox<|im_end|>", "The Eagle is cheap.<|im_end|>"]
    assert chatml.decode(row["input_ids"]) == chatml.apply_chat_template(record["messages"], tokenize=False)
    assert (tokenized.truncated, tokenized.dropped, tokenized.kind) == (0, 0, "chat")


def test_end_of_turn_other_than_eos_is_learned():
    tokenizer = chat_tokenizer(LLAMA3, eos="<|end_of_text|>")
    row = tokenize_examples(chat_examples(GOOD), tokenizer, max_length=1000).rows[0]
    assert supervised_spans(tokenizer, row) == ["hello there<|eot_id|>"]


def test_template_that_rewrites_history_is_a_clear_error():
    tokenizer = chat_tokenizer(REWRITING)
    one_turn = tokenize_examples(chat_examples(GOOD), tokenizer, max_length=100)  # fine: nothing rewritten
    assert supervised_spans(tokenizer, one_turn.rows[0]) == ["hello there<|im_end|>"]
    with pytest.raises(DataError) as excinfo:
        tokenize_examples(chat_examples(GOOD, chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))),
                          tokenizer, max_length=100)
    assert "mem.jsonl:2: messages[1]: tokenizer " in str(excinfo.value)
    assert "does not render messages[:1] plus the generation prompt as a prefix of messages[:2]" in str(excinfo.value)


def test_truncation_counts_and_drops(chatml):
    short, long = GOOD, chat(("user", "the quick brown fox " * 5), ("assistant", "hello there"))
    full = tokenize_examples(chat_examples(short, long), chatml, max_length=1000)
    keep = full.lengths[0]  # the short one fits, the long one's answer is cut off entirely
    tokenized = tokenize_examples(chat_examples(short, long), chatml, max_length=keep)
    assert (tokenized.truncated, tokenized.dropped, len(tokenized.rows)) == (1, 1, 1)
    answer_starts = full.rows[0]["labels"].index(next(x for x in full.rows[0]["labels"] if x != -100))
    tokenized = tokenize_examples(chat_examples(short), chatml, max_length=answer_starts + 2)
    assert (tokenized.truncated, tokenized.dropped, tokenized.lengths) == (1, 0, [answer_starts + 2])
    with pytest.raises(DataError, match="lost all its assistant tokens to truncation at max_length=3"):
        tokenize_examples(chat_examples(short), chatml, max_length=3)
    with pytest.raises(ConfigError, match="max_length=0 must be a positive integer"):
        tokenize_examples(chat_examples(short), chatml, max_length=0)


def test_text_and_classification_tokenization(chatml, tmp_path):
    (tmp_path / "t.txt").write_text("hello there\n\nthe quick brown fox jumps over the lazy dog\n")
    tokenized = tokenize_examples(read_examples(tmp_path / "t.txt"), chatml, max_length=8)
    first, second = tokenized.rows
    assert first["labels"] == first["input_ids"] and first["input_ids"][-1] == chatml.eos_token_id
    assert (tokenized.truncated, len(second["input_ids"])) == (1, 8)
    (tmp_path / "c.tsv").write_text("sentence\tlabel\nhello there\t1\nthe quick brown fox jumps over the lazy dog\t0\n")
    tokenized = tokenize_examples(read_examples(tmp_path / "c.tsv"), chatml, max_length=4)
    assert [row["label"] for row in tokenized.rows] == [1, 0] and tokenized.truncated == 1
    assert max(tokenized.lengths) == 4 and "labels" not in tokenized.rows[0]


def smollm2_path():
    return next((p for p in SMOLLM2_PATHS if (p / "tokenizer.json").exists()), None)


@pytest.mark.skipif(smollm2_path() is None, reason=f"no local SmolLM2 tokenizer in {[str(p) for p in SMOLLM2_PATHS]}")
def test_real_smollm2_template_masks_assistant_and_im_end():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path()))
    record = chat(("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?"), ("assistant", "Red, or green."))
    row = tokenize_examples(chat_examples(record), tokenizer, max_length=512).rows[0]
    assert supervised_spans(tokenizer, row) == ["Blue.<|im_end|>", "Red, or green.<|im_end|>"]
    assert "You are a helpful AI assistant" in tokenizer.decode(row["input_ids"])  # its default system prompt


# --- batching -----------------------------------------------------------------------------------

def test_batch_indices_deterministic_complete_and_grouped():
    lengths = torch.randint(1, 1000, (1003,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = batch_indices(lengths, 8, seed=3, epoch=1)
    assert batches == batch_indices(lengths, 8, seed=3, epoch=1)
    assert batches != batch_indices(lengths, 8, seed=3, epoch=2) != batch_indices(lengths, 8, seed=4, epoch=1)
    assert sorted(i for batch in batches for i in batch) == list(range(1003))
    assert sorted(len(b) for b in batches)[0] == 1003 % 8 and len(batches) == 126  # the short batch is kept

    def spread(bs):  # mean (longest - shortest) within a batch
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs) / len(bs)
    plain = batch_indices(lengths, 8, seed=3, epoch=1, group_by_length=False)
    assert sorted(i for batch in plain for i in batch) == list(range(1003))
    assert spread(batches) < 60 < 600 < spread(plain)
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts, reverse=True)  # batch order is random, not longest first
    assert batch_indices(lengths[:10], 4, seed=0, epoch=0, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ConfigError, match="batch_size=0"):
        batch_indices(lengths, 0, seed=0, epoch=0)


def test_collate_pads_on_the_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    batch = collate([{"input_ids": [5], "label": 1}, {"input_ids": [8, 9], "label": 0}], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 2], [8, 9]] and batch["labels"].tolist() == [1, 0]
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (2,)


# --- the real files -----------------------------------------------------------------------------

def real_file(relative: str) -> Path:
    """The project's copy (data/) if it has one, else the shared folder beside it; skip if neither."""
    for root in DATA_ROOTS:
        if (root / relative).exists():
            return root / relative
    pytest.skip(f"{relative} is in none of {[str(r) for r in DATA_ROOTS]}")


def test_real_e2e_train_is_chat():
    train = read_examples(real_file("e2e/train.jsonl"))
    assert (train.kind, train.format, len(train)) == ("chat", "chat", 4203)


def test_real_e2e_validation_has_references():
    validation = read_examples(real_file("e2e/validation.jsonl"))
    assert (validation.kind, validation.format, len(validation)) == ("chat", "references", 60)
    assert all(len(c) == 1 and c[0]["role"] == "user" for c in validation.conversations())
    assert all(len(r) >= 1 for r in validation.references())


def test_real_sst2_dev_is_classification():
    dev = read_examples(real_file("sst2/dev.tsv"))
    assert (dev.kind, len(dev), dev.label_names) == ("classification", 6735, ["0", "1"])
    assert {ex.label for ex in dev.items} == {0, 1} and all(ex.text == ex.text.strip() for ex in dev.items)
