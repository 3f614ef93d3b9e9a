"""From examples to token ids and loss labels, using the model's own chat template.

Chat: the loss falls only on what the assistant says. Templates differ (default system prompts,
headers, end-of-turn tokens), so rather than parse the rendered text we let the template speak:
for assistant message i, the tokens of `messages[:i]` rendered with the generation prompt are a
prefix of the tokens of `messages[:i+1]`, and the difference is that message's span — its content,
the end-of-turn token that closes it (which the model must learn to emit, or it never stops) and
whatever the template writes after it (ChatML's newline, which is not learned: the span ends at the
first end-of-turn token). Text: every token is learned. Classification: ids and an integer label.
Preference: each pair's two conversations tokenized the same way as chat, the answer alone supervised.

Labels use -100 (PyTorch's cross-entropy `ignore_index`) for tokens without loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from feathertune.data.formats import Examples
from feathertune.errors import ConfigError, DataError

IGNORE_INDEX = -100
# Tokens that close a turn in common templates, used beside eos (e.g. Llama 3 ends turns with
# <|eot_id|> but its eos is <|end_of_text|>; Qwen's base eos is <|endoftext|> while turns end with <|im_end|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
RENDER_CHUNK = 512  # conversations rendered and tokenized per call
MAX_PROBLEMS = 50


@dataclass
class Tokenized:
    """Rows ready for `collate`: {"input_ids", "labels"} (chat, text), {"input_ids", "label"}
    (classification), or for preference pairs the preferred answer's {"input_ids", "labels"} and the
    other's {"rejected_input_ids", "rejected_labels"}.

    `truncated` counts the examples cut to max_length (dropped ones included); `dropped` those left
    out because truncation removed every token that had a loss.
    """

    rows: list[dict]
    truncated: int
    kind: str
    dropped: int = 0

    @property
    def lengths(self) -> list[int]:
        return [max(len(row["input_ids"]), len(row.get("rejected_input_ids", ()))) for row in self.rows]


def tokenize_examples(examples: Examples, tokenizer, max_length: int) -> Tokenized:
    """Tokenize every example and mark which tokens carry the loss.

    Args:
        examples: from `read_examples`.
        tokenizer: a Hugging Face tokenizer; chat examples need one with a chat template.
        max_length: sequences are cut to this many tokens, keeping the start.

    Raises:
        ConfigError: max_length is not a positive integer, or chat data meets a tokenizer
            without a chat template.
        DataError: the chat template does not render conversations so that the assistant's tokens
            can be found (each affected example listed), or truncation left nothing to learn.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError([f"max_length={max_length!r} must be a positive integer (tokens per example)"],
                          source="tokenize_examples")
    if examples.kind == "chat":
        return _truncate(examples, *_tokenize_chat(examples, tokenizer), max_length)
    if examples.kind == "preference":
        return _tokenize_preference(examples, tokenizer, max_length)
    texts = [ex.text for ex in examples.items]
    if examples.kind == "text":
        return _tokenize_text(texts, tokenizer, max_length)
    if examples.kind == "classification":
        return _tokenize_classification(texts, [ex.label for ex in examples.items], tokenizer, max_length)
    raise ConfigError([f"examples.kind={examples.kind!r} is not one of chat, preference, text, classification"],
                      source="tokenize_examples")


def _tokenize_chat(examples: Examples, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Every conversation's ids and labels (the assistant's weighted turns), before truncation."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError([f"tokenizer {name!r} has no chat template, and chat data needs one; use an "
                           "instruct/chat model's tokenizer or set tokenizer.chat_template"],
                          source="tokenize_examples")
    conversations = [[{k: v for k, v in m.items() if k != "weight"} for m in ex.messages]
                     for ex in examples.items]
    full = _render(tokenizer, conversations, generation=False)
    turns = [(k, i) for k, ex in enumerate(examples.items) for i, m in enumerate(ex.messages)
             if m["role"] == "assistant" and m.get("weight", 1) != 0]
    prefixes = _render(tokenizer, [conversations[k][:i] for k, i in turns], generation=True)
    inner = [(k, i) for k, i in turns if i + 1 < len(conversations[k])]  # the last turn's is `full`
    through = dict(zip(inner, _render(tokenizer, [conversations[k][:i + 1] for k, i in inner], generation=False)))
    ends = end_of_turn_ids(tokenizer)
    labels = [[IGNORE_INDEX] * len(ids) if isinstance(ids, list) else None for ids in full]
    problems = []
    for k, ids in enumerate(full):
        if not isinstance(ids, list):
            problems.append(f"{examples.path}:{examples.items[k].line}: messages: the chat template of "
                            f"tokenizer {name!r} failed on this conversation: {ids}")
    for (k, i), prefix in zip(turns, prefixes):
        if labels[k] is None:
            continue
        problem = _mark_turn(labels[k], full[k], prefix, through.get((k, i), full[k]), ends, i)
        if problem:
            problems.append(f"{examples.path}:{examples.items[k].line}: messages[{i}]: tokenizer {name!r}: {problem}")
    if problems:
        raise DataError(problems[:MAX_PROBLEMS], examples.path, total=len(problems))
    return full, labels


def _tokenize_preference(examples: Examples, tokenizer, max_length: int) -> Tokenized:
    """Both answers of each pair, tokenized as chat. A pair truncation leaves either answer with no
    token is dropped whole: DPO compares the two."""
    rejected = Examples("chat", [dataclasses.replace(ex, messages=ex.rejected) for ex in examples.items],
                        examples.path, examples.format)
    chosen_ids, chosen_labels = _tokenize_chat(examples, tokenizer)
    rejected_ids, rejected_labels = _tokenize_chat(rejected, tokenizer)
    rows, truncated, dropped = [], 0, 0
    for ids, labs, other_ids, other_labs in zip(chosen_ids, chosen_labels, rejected_ids, rejected_labels):
        if max(len(ids), len(other_ids)) > max_length:
            truncated += 1
            ids, labs, other_ids, other_labs = (x[:max_length] for x in (ids, labs, other_ids, other_labs))
            if all(t == IGNORE_INDEX for t in labs) or all(t == IGNORE_INDEX for t in other_labs):
                dropped += 1
                continue
        rows.append({"input_ids": ids, "labels": labs, "rejected_input_ids": other_ids, "rejected_labels": other_labs})
    if not rows:
        raise DataError([f"{examples.path}: every one of the {len(chosen_ids)} pairs lost an answer to truncation "
                         f"at max_length={max_length}: raise max_length or shorten the prompts"], examples.path)
    return Tokenized(rows, truncated, "preference", dropped)


def _mark_turn(labels: list[int], ids: list[int], prefix, through, ends: set[int], i: int) -> str | None:
    """Copy the ids of assistant turn i into `labels`, up to and including its end-of-turn token.
    Returns what went wrong instead, if the template makes the turn impossible to locate."""
    for rendered in (prefix, through):
        if not isinstance(rendered, list):
            return f"the chat template failed on the first {i} or {i + 1} messages: {rendered}"
    if through[: len(prefix)] != prefix or ids[: len(through)] != through:
        return (f"the chat template does not render messages[:{i}] plus the generation prompt as a prefix "
                f"of messages[:{i + 1}], so the assistant's tokens cannot be located. Templates that rewrite "
                "earlier turns, or add a default system prompt only before a first user message, do this; "
                "start the conversation with a system or user message, or use another template")
    start, stop = len(prefix), len(through)
    if start == stop:
        return "the chat template renders this assistant message as no tokens at all"
    stop = next((j + 1 for j in range(start, stop) if ids[j] in ends), stop)
    labels[start:stop] = ids[start:stop]
    return None


def _truncate(examples: Examples, full: list[list[int]], labels: list[list[int]], max_length: int) -> Tokenized:
    rows, truncated, dropped = [], 0, 0
    for ids, labs in zip(full, labels):
        if len(ids) > max_length:
            truncated += 1
            ids, labs = ids[:max_length], labs[:max_length]
            if all(label == IGNORE_INDEX for label in labs):
                dropped += 1  # nothing left to learn from
                continue
        rows.append({"input_ids": ids, "labels": labs})
    if not rows:
        shortest = min(next(j for j, label in enumerate(labs) if label != IGNORE_INDEX) for labs in labels)
        raise DataError([f"{examples.path}: every one of the {len(labels)} examples lost all its assistant "
                         f"tokens to truncation at max_length={max_length}; the shortest prompt is {shortest} "
                         "tokens: raise max_length or shorten the prompts"], examples.path)
    return Tokenized(rows, truncated, "chat", dropped)


def _tokenize_text(texts: list[str], tokenizer, max_length: int) -> Tokenized:
    eos = tokenizer.eos_token_id
    rows, truncated = [], 0
    for ids in _encode(tokenizer, texts):
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]  # so that the model learns where a text ends
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return Tokenized(rows, truncated, "text")


def _tokenize_classification(texts: list[str], labels: list[int], tokenizer, max_length: int) -> Tokenized:
    ids = _encode(tokenizer, texts)
    long = [k for k, row in enumerate(ids) if len(row) > max_length]
    if long:  # the tokenizer truncates (keeping e.g. RoBERTa's closing </s>); only the long ones need it
        cut = _encode(tokenizer, [texts[k] for k in long], truncation=True, max_length=max_length)
        for k, row in zip(long, cut):
            ids[k] = row
    rows = [{"input_ids": row, "label": label} for row, label in zip(ids, labels)]
    return Tokenized(rows, len(long), "classification")


def end_of_turn_ids(tokenizer) -> set[int]:
    """The ids that close an assistant turn: eos, and the known end-of-turn tokens the tokenizer has."""
    ends = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    added = tokenizer.get_added_vocab()
    return ends | {added[token] for token in END_OF_TURN_TOKENS if token in added}


def _encode(tokenizer, texts: list[str], **kwargs) -> list[list[int]]:
    ids = []
    for start in range(0, len(texts), RENDER_CHUNK):
        ids += [list(row) for row in tokenizer(texts[start:start + RENDER_CHUNK], **kwargs)["input_ids"]]
    return ids


def _render(tokenizer, conversations: list[list[dict]], generation: bool) -> list:
    """Token ids of each conversation through the chat template; an Exception in place of the ids of
    a conversation the template fails on (templates raise anything: jinja errors, raise_exception)."""
    out = []
    for start in range(0, len(conversations), RENDER_CHUNK):
        chunk = conversations[start:start + RENDER_CHUNK]
        try:
            out += _id_lists(tokenizer.apply_chat_template(chunk, add_generation_prompt=generation,
                                                           tokenize=True, return_dict=False))
        except Exception:  # find which conversations fail, to report them by line
            for conversation in chunk:
                try:
                    out += _id_lists(tokenizer.apply_chat_template([conversation], add_generation_prompt=generation,
                                                                   tokenize=True, return_dict=False))
                except Exception as exc:
                    out.append(exc)
    return out


def _id_lists(result) -> list[list[int]]:
    """apply_chat_template's output as lists of ids, whichever container this transformers returns."""
    if isinstance(result, Mapping):
        result = result["input_ids"]
    return [list(ids) for ids in result]
