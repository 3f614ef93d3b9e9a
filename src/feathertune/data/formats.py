"""Reading training data: every supported file format, validated in full before anything trains.

A file becomes `Examples`: a list of `Example`s of one kind.
- "chat": conversations. OpenAI chat JSONL is read as is; alpaca, prompt/completion and
  prompt/references JSONL become one user turn and one assistant turn.
- "text": plain text for language modelling (loss on every token): a .txt file, one example per
  paragraph, or JSONL with a text field.
- "classification": a text and an integer label, from .tsv/.csv with a header row or from JSONL.
- "preference": pairs for preference tuning (DPO), in the JSONL hosted fine-tuning APIs take:
  {"input": {"messages": [...]}, "preferred_output": [assistant message],
  "non_preferred_output": [assistant message]}; the example's `messages` are the prompt and the
  preferred answer, its `rejected` the prompt and the other.

Every problem is collected as 'path:LINE: field: what is wrong' and one DataError lists them all,
so that one run of the validator fixes a whole file instead of one crash per training attempt.
Line numbers are those of the file (blank lines are skipped but counted).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from feathertune.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")
KINDS = {"chat": "chat", "alpaca": "chat", "prompt_completion": "chat", "references": "chat",
         "preference": "preference", "text": "text", "classification": "classification"}
FORMATS = ("auto", *KINDS)
TABLE_DELIMITERS = {".tsv": "\t", ".csv": ","}
# the keys by which "auto" recognises a JSONL format, tried in this order
REQUIRED_KEYS = {"chat": ["messages"], "alpaca": ["instruction", "output"],
                 "prompt_completion": ["prompt", "completion"], "references": ["prompt", "references"],
                 "preference": ["input", "preferred_output", "non_preferred_output"]}
# "auto" reads a file as preference pairs when its first record has any of these: a first line with one
# of them missing is then reported as a broken pair, not as a file of no known format.
PREFERENCE_KEYS = ("preferred_output", "non_preferred_output")
PREFERENCE_HINT = ('{"input": {"messages": [{"role": "user", "content": "..."}]}, "preferred_output": [{"role": '
                   '"assistant", "content": "..."}], "non_preferred_output": [{"role": "assistant", "content": "..."}]}')
TEXT_ALIAS = "sentence"  # GLUE's column name, accepted when text_field="text" is absent
CHAT_HINT = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'

Add = Callable[[str, str], None]  # add(field, message): report one problem on the current line


@dataclass
class Example:
    """One validated example. `line` is where it starts in the file, for messages that point there."""

    line: int
    messages: list[dict] | None = None  # kind "chat"
    text: str | None = None  # kinds "text" and "classification"
    label: int | None = None  # kind "classification": index into Examples.label_names
    references: list[str] | None = None  # format "references": every acceptable answer
    rejected: list[dict] | None = None  # kind "preference": the prompt and the non-preferred answer


@dataclass
class Examples:
    """The examples of one file, all of one `kind` ("chat", "preference", "text" or "classification")."""

    kind: str
    items: list[Example]
    path: str
    format: str  # the format actually read, never "auto"
    label_names: list[str] | None = None  # classification: label index -> name

    def __len__(self) -> int:
        return len(self.items)

    def conversations(self) -> list[list[dict]]:
        """Prompts for generation: each conversation up to (not including) its last assistant turn."""
        self._require_chat("conversations()")
        prompts = []
        for ex in self.items:
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            prompts.append([{k: v for k, v in m.items() if k != "weight"} for m in ex.messages[:last]])
        return prompts

    def references(self) -> list[list[str]]:
        """What generations are scored against: `.references` if the file has them, else the last
        assistant turn, one list per example."""
        self._require_chat("references()")
        return [list(ex.references) if ex.references is not None
                else [next(m["content"] for m in reversed(ex.messages) if m["role"] == "assistant")]
                for ex in self.items]

    def _require_chat(self, what: str) -> None:
        if self.kind not in ("chat", "preference"):
            raise DataError([f"{self.path}: {what} needs chat examples, but this file was read as "
                             f"{self.kind!r} (format {self.format!r})"], self.path)


def read_examples(path, format: str = "auto", *, text_field: str = "text", label_field: str = "label",
                  label_names: list[str] | None = None, max_problems: int = 50) -> Examples:
    """Read and validate every example of a data file.

    Args:
        path: a .jsonl (or any JSON-lines file), .txt, .tsv or .csv file.
        format: one of auto, chat, alpaca, prompt_completion, references, preference, text,
            classification.
            "auto" decides by extension (.tsv/.csv: classification, .txt: text) and, for JSONL,
            by the keys of the first valid record.
        text_field, label_field: the keys (JSONL) or header columns (TSV/CSV) holding the text and
            the label. With the default text_field="text", a `sentence` field is accepted instead
            when there is no `text` (GLUE's SST-2 files use `sentence`).
        label_names: the allowed labels, in index order; a label outside them is an error. Left out,
            they are the labels found in this file, sorted (numerically when all are numbers).
            Integer labels are matched as text (1 and "1" are the same label), not as indices.
        max_problems: how many problems the error shows; all are counted.

    Raises:
        DataError: the file is missing, empty, or has bad examples (all of them listed).
        ConfigError: an argument is invalid (e.g. an unknown format).
    """
    _check_arguments(format, text_field, label_field, label_names, max_problems)
    path = os.fspath(path)
    problems = Problems(path, max_problems)
    fields = Fields(text_field, label_field)
    extension = os.path.splitext(path)[1].lower()
    content = _read_text(path)
    header = None
    if extension in TABLE_DELIMITERS:
        header, records = _table_records(content, TABLE_DELIMITERS[extension], problems)
    elif extension == ".txt":
        records = _paragraph_records(content, text_field)
    else:
        records = _jsonl_records(content, problems)
    if format == "auto":
        format = _detect(records, extension, fields, problems)
    if header is not None:
        _check_header(header, format, fields, problems)
    if format == "classification":
        items, label_names = _classification_items(records, fields, label_names, problems)
    else:
        items = [ex for ex in (_validated(line, rec, format, fields, problems) for line, rec in records) if ex]
    problems.raise_if_any()
    if not items:
        raise DataError([f"{path}: no examples: the file is empty or has only blank lines"
                         + (" (or only a header row)" if extension in TABLE_DELIMITERS else "")], path)
    return Examples(KINDS[format], items, path, format, label_names)


# --- collecting problems ------------------------------------------------------------------------

class Problems:
    """Every problem of a file, raised as one DataError in line order, the first `cap` shown."""

    def __init__(self, path: str, cap: int):
        self.path, self.cap, self.found = path, cap, []

    def add(self, line: int, field: str, message: str) -> None:
        self.found.append((line, f"{self.path}:{line}: {field}: {message}"))

    def at(self, line: int) -> Add:
        return lambda field, message: self.add(line, field, message)

    def raise_if_any(self) -> None:
        if self.found:
            ordered = [text for _, text in sorted(self.found, key=lambda p: p[0])]
            raise DataError(ordered[: self.cap], self.path, total=len(ordered))


@dataclass
class Fields:
    text: str
    label: str

    def text_key(self, keys) -> str:
        """The key that holds the text: text_field, or `sentence` standing in for the default."""
        if self.text not in keys and self.text == "text" and TEXT_ALIAS in keys:
            return TEXT_ALIAS
        return self.text


def _check_arguments(format, text_field, label_field, label_names, max_problems) -> None:
    problems = []
    if format not in FORMATS:
        hint = difflib.get_close_matches(str(format), FORMATS, n=1)
        problems.append(f"format={format!r} is not one of {', '.join(FORMATS)}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    for name, value in (("text_field", text_field), ("label_field", label_field)):
        if not isinstance(value, str) or not value:
            problems.append(f"{name}={value!r} must be a non-empty string naming a key or column")
    if label_names is not None and (not isinstance(label_names, (list, tuple)) or not label_names
                                    or len({str(n) for n in label_names}) != len(label_names)):
        problems.append(f"label_names={label_names!r} must be a non-empty list of distinct labels, or None "
                        "to take the labels found in the file")
    if isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 1:
        problems.append(f"max_problems={max_problems!r} must be a positive integer")
    if problems:
        raise ConfigError(problems, source="read_examples")


# --- from file to records (line number, dict) ---------------------------------------------------

def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise DataError([f"{path}: no such file (looked at {os.path.abspath(path)})"], path)
    if os.path.isdir(path):
        raise DataError([f"{path}: is a directory; give the data file inside it"], path)
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError([f"{path}:{line}: file: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "re-save the file as UTF-8"], path) from None


def _jsonl_records(content: str, problems: Problems) -> list[tuple[int, dict]]:
    records = []
    # split on "\n" only: str.splitlines() would also split at U+2028 or \x85 inside a JSON string
    for line, text in enumerate(content.split("\n"), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(line, "json", f"not valid JSON: {exc.msg} (column {exc.colno}); each line must be "
                                       "one JSON object")
            continue
        if not isinstance(record, dict):
            problems.add(line, "json", f"expected a JSON object like {CHAT_HINT}, got {_json_type(record)}")
            continue
        records.append((line, record))
    return records


def _paragraph_records(content: str, text_field: str) -> list[tuple[int, dict]]:
    """One record per paragraph; paragraphs are separated by blank lines."""
    records, lines, start = [], [], 0
    for line, text in enumerate([*content.split("\n"), ""], start=1):
        if text.strip():
            start = start or line
            lines.append(text)
        elif lines:
            records.append((start, {text_field: "\n".join(lines).strip()}))
            lines, start = [], 0
    return records


def _table_records(content: str, delimiter: str, problems: Problems):
    """The header row of a TSV/CSV file (None if there is none) and its rows as dicts keyed by it.
    Quoted fields (which may span lines) are handled by the csv module."""
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    what = "tab" if delimiter == "\t" else "comma"
    records, header, start = [], None, 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
            elif len(row) != len(header):
                problems.add(line, "row", f"has {len(row)} fields but the header has {len(header)} "
                                          f"({', '.join(header)}); look for a stray {what} or an unclosed quote")
            else:
                records.append((line, dict(zip(header, row))))
    except csv.Error as exc:
        problems.add(start, "row", f"cannot be read: {exc}")
    return header, records


def _check_header(columns: list[str], format: str, fields: Fields, problems: Problems) -> None:
    """A TSV/CSV column missing from the header would fail every row: say it once, at the header."""
    needed = {"classification": [fields.label, fields.text_key(columns)], "text": [fields.text_key(columns)]}
    missing = [c for c in needed.get(format, REQUIRED_KEYS.get(format, [])) if c not in columns]
    for column in missing:
        alias = f" (nor {TEXT_ALIAS!r})" if column == "text" else ""
        fix = ("pass label_field= naming the right column" if column == fields.label
               else "pass text_field= naming the right column" if format in ("classification", "text")
               else f"the {format} format is read from JSONL: give a .jsonl file")
        problems.add(1, "header", f"has no column {column!r}{alias}; the columns are {', '.join(columns)}; {fix}")
    problems.raise_if_any()


# --- deciding the format ------------------------------------------------------------------------

def _detect(records, extension: str, fields: Fields, problems: Problems) -> str:
    if extension in TABLE_DELIMITERS:
        return "classification"
    if extension == ".txt":
        return "text"
    if not records:
        problems.raise_if_any()  # no line was a JSON object: those problems say why
        return "chat"  # an empty file: reported as such by the caller
    line, record = records[0]
    keys = set(record)
    if keys & set(PREFERENCE_KEYS):
        return "preference"
    for format, required in REQUIRED_KEYS.items():
        if keys >= set(required):
            return format
    if fields.label in keys:
        return "classification"
    if fields.text_key(keys) in keys:
        return "text"
    known = "; ".join([f"{f} ({', '.join(k)})" for f, k in REQUIRED_KEYS.items()]
                      + [f"classification ({fields.label}, {fields.text})", f"text ({fields.text})"])
    problems.add(line, "keys", f"found {', '.join(sorted(keys)) or 'no keys'} in the first record, which fit "
                               f"no format; the formats and their keys: {known}; rename the keys, or pass "
                               "format= (and text_field=/label_field= for other names)")
    problems.raise_if_any()
    raise AssertionError("unreachable")


# --- from record to Example ---------------------------------------------------------------------

def _validated(line: int, record: dict, format: str, fields: Fields, problems: Problems) -> Example | None:
    add = problems.at(line)
    if format == "text":
        text = _string(record, fields.text_key(record), add)
        return Example(line, text=text) if text is not None else None
    if format == "references":
        return _references_example(line, record, add)
    if format == "preference":
        return _preference_example(line, record, add)
    messages = {"chat": _chat_messages, "alpaca": _alpaca_messages,
                "prompt_completion": _prompt_completion_messages}[format](record, add)
    return Example(line, messages=messages) if messages is not None else None


def _chat_messages(record: dict, add: Add) -> list[dict] | None:
    if "messages" not in record:
        add("messages", f"missing; each line needs {CHAT_HINT}")
        return None
    messages = record["messages"]
    if not isinstance(messages, list):
        add("messages", f"expected a list of messages, got {_json_type(messages)}")
        return None
    if not messages:
        add("messages", f"is empty; each line needs {CHAT_HINT}")
        return None
    results = [_check_message(m, f"messages[{i}]", add) for i, m in enumerate(messages)]
    assistants = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    roles_ok = all(isinstance(m, dict) and m.get("role") in ROLES for m in messages)
    if roles_ok and not assistants:
        add("messages", 'has no assistant message, so there is nothing to learn; add a {"role": "assistant", '
                        '"content": "..."} turn')
        return None
    if assistants and all(m.get("weight", 1) == 0 for m in assistants):
        add("messages", "every assistant message has weight 0, so there is nothing to learn; set weight 1 on "
                        "one, or drop the example")
        return None
    return [dict(m) for m in messages] if all(results) and roles_ok else None


def _check_message(message, where: str, add: Add) -> bool:
    if not isinstance(message, dict):
        add(where, f'expected an object like {{"role": "user", "content": "..."}}, got {_json_type(message)}')
        return False
    ok = True
    role = message.get("role")
    if "role" not in message:
        add(f"{where}.role", f"missing; use one of {', '.join(ROLES)}")
        ok = False
    elif role not in ROLES:
        hint = difflib.get_close_matches(str(role), ROLES, n=1)
        add(f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        ok = False
    content = message.get("content")
    if "content" not in message:
        add(f"{where}.content", "missing; every message needs its text as a string")
        ok = False
    elif not isinstance(content, str):
        parts = " (content parts are not supported: join the text into one string)" if isinstance(content, list) else ""
        add(f"{where}.content", f"expected a string, got {_json_type(content)}{parts}")
        ok = False
    elif not content.strip():
        add(f"{where}.content", "is empty; write the message's text, or remove the message")
        ok = False
    if "weight" in message:
        weight = message["weight"]
        if role in ROLES and role != "assistant":
            add(f"{where}.weight", f"only assistant messages take a weight, this one is {role!r}; remove it")
            ok = False
        elif isinstance(weight, bool) or weight not in (0, 1):
            add(f"{where}.weight", f"{weight!r} is not 0 or 1 (0: no loss on this turn, 1: learn it)")
            ok = False
    return ok


def _alpaca_messages(record: dict, add: Add) -> list[dict] | None:
    instruction = _string(record, "instruction", add)
    output = _string(record, "output", add)
    extra = record.get("input")
    extra = "" if extra is None else extra
    if not isinstance(extra, str):
        add("input", f"expected a string (or leave it out), got {_json_type(extra)}")
        return None
    if instruction is None or output is None:
        return None
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_completion_messages(record: dict, add: Add) -> list[dict] | None:
    prompt, completion = _string(record, "prompt", add), _string(record, "completion", add)
    if prompt is None or completion is None:
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _references_example(line: int, record: dict, add: Add) -> Example | None:
    prompt = _string(record, "prompt", add)
    references = record.get("references")
    if not isinstance(references, list) or not references:
        add("references", "missing; give a non-empty list of reference answers" if references is None
            else f"expected a non-empty list of strings, got {_json_type(references)}")
        return None
    bad = [i for i, r in enumerate(references) if not isinstance(r, str) or not r.strip()]
    for i in bad:
        add(f"references[{i}]", f"expected a non-empty string, got {_json_type(references[i])}")
    if prompt is None or bad:
        return None
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": references[0]}]
    return Example(line, messages=messages, references=list(references))


def _preference_example(line: int, record: dict, add: Add) -> Example | None:
    """A prompt (input.messages, ending before the answer) and two answers to it, one assistant message each."""
    prompt = record.get("input")
    if "input" not in record:
        add("input", f"missing; each line needs {PREFERENCE_HINT}")
    elif not isinstance(prompt, dict) or "messages" not in prompt:
        add("input", f'expected an object {{"messages": [...]}}, got {_json_type(prompt)}'
            + (f" with keys {', '.join(prompt)}" if isinstance(prompt, dict) else ""))
    prompt_messages = _prompt_messages(prompt["messages"], add) if isinstance(prompt, dict) and "messages" in prompt \
        else None
    answers = [_answer(record, key, add) for key in PREFERENCE_KEYS]
    if prompt_messages is None or None in answers:
        return None
    if answers[0]["content"] == answers[1]["content"]:
        add("non_preferred_output", "is the same text as preferred_output, so there is nothing to prefer; give "
                                    "two different answers, or drop the example")
        return None
    return Example(line, messages=[*prompt_messages, answers[0]], rejected=[*prompt_messages, answers[1]])


def _prompt_messages(messages, add: Add) -> list[dict] | None:
    where = "input.messages"
    if not isinstance(messages, list) or not messages:
        add(where, f"expected a non-empty list of messages, got {_json_type(messages)}" if not isinstance(messages, list)
            else "is empty; give the conversation the answers reply to")
        return None
    results = [_check_message(m, f"{where}[{i}]", add) for i, m in enumerate(messages)]
    if not all(results):
        return None
    if messages[-1]["role"] == "assistant":
        add(f"{where}[{len(messages) - 1}].role", "the conversation ends with an assistant message, but the answers "
                                                  "(preferred_output, non_preferred_output) are what replies to it; "
                                                  "end input.messages with the user's turn")
        return None
    # Earlier assistant turns are context: the preference is about the answers alone.
    return [{**{k: v for k, v in m.items() if k != "weight"}, **({"weight": 0} if m["role"] == "assistant" else {})}
            for m in messages]


def _answer(record: dict, key: str, add: Add) -> dict | None:
    """`key`'s one assistant message."""
    if key not in record:
        add(key, f"missing; each line needs {PREFERENCE_HINT}")
        return None
    answer = record[key]
    if not isinstance(answer, list) or len(answer) != 1:
        add(key, "expected a list holding one assistant message, "
            + (f"got {len(answer)} messages" if isinstance(answer, list) else f"got {_json_type(answer)}"))
        return None
    if not _check_message(answer[0], f"{key}[0]", add):
        return None
    if answer[0]["role"] != "assistant":
        add(f"{key}[0].role", f"{answer[0]['role']!r}: an answer is the assistant's; use \"assistant\"")
        return None
    if "weight" in answer[0]:
        add(f"{key}[0].weight", "an answer takes no weight: the preference between the two is what is learned")
        return None
    return {"role": "assistant", "content": answer[0]["content"]}


def _classification_items(records, fields: Fields, label_names, problems: Problems):
    """Validate texts and labels, then number the labels (given names, or those found, sorted)."""
    names = [str(n) for n in label_names] if label_names is not None else None
    found = []  # (Example, label as text)
    for line, record in records:
        add = problems.at(line)
        text = _string(record, fields.text_key(record), add)
        label = _label(record, fields.label, add)
        if label is not None and names is not None and label not in names:
            add(fields.label, f"{label!r} is not one of the labels {', '.join(names)} (label_names); fix the "
                              "label, or add it to label_names")
            label = None
        if text is not None and label is not None:
            found.append((Example(line, text=text.strip()), label))
    names = names if names is not None else sorted({label for _, label in found}, key=_label_order)
    index = {name: i for i, name in enumerate(names)}
    for example, label in found:
        example.label = index[label]
    return [example for example, _ in found], names


def _label(record: dict, key: str, add: Add) -> str | None:
    if key not in record:
        add(key, "missing; each example needs a label (pass label_field= if it is under another name)")
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        add(key, f"expected an integer or a string, got {_json_type(value)} {value!r}")
        return None
    text = str(value).strip()
    if not text:
        add(key, "is empty; give each example its label")
        return None
    return text


def _label_order(name: str):
    """Numeric labels in numeric order ("2" before "10"), then the others alphabetically."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _string(record: dict, key: str, add: Add) -> str | None:
    """record[key] if it is a non-blank string; otherwise report why not and return None."""
    if key not in record:
        add(key, f"missing; the keys here are {', '.join(record) or 'none'}")
        return None
    value = record[key]
    if not isinstance(value, str):
        add(key, f"expected a string, got {_json_type(value)}")
        return None
    if not value.strip():
        add(key, "is empty; write the text, or drop the example")
        return None
    return value


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
