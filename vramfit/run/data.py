"""Training data: read, detect the format, check every row, split, and measure token lengths.

Sources: a JSONL, JSON, CSV or Parquet file, a `datasets.save_to_disk` folder, or a hub dataset
name (online only).  Formats, detected from the columns or forced with `format`:

    alpaca             instruction, optional input, output -> prompt/completion (Stanford Alpaca's prompt)
    prompt-completion  prompt, completion (loss on the completion: trl's default for this format)
    messages           chat turns rendered by the tokenizer's chat template (loss on assistant turns)
    text               plain text (loss on every token)

Every row is checked (missing fields, wrong types, empty values) and a bad one is reported by
where it is: "line N" for JSONL/JSON/CSV files, "record N" (1-based) for the other sources.
The token lengths are measured with the model's tokenizer before any GPU work, so the sequence
length handed to the planner is the data's, not a guess.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from vramfit.errors import VramfitError

FORMATS = ("alpaca", "prompt-completion", "messages", "text")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_VAL_SPLIT = 0.1
SEQ_LEN_BASES = ("max", "p99")
# Bad rows quoted in a message or a report; the count is always complete.
BAD_ROWS_SHOWN = 5
# Rows looked at to detect the format (enough to outvote a few bad rows at the top).
DETECT_ROWS = 200

# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# The columns each format needs; detection picks the format most rows have (ties: this order).
REQUIRED = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"),
            "alpaca": ("instruction", "output"), "text": ("text",)}


@dataclass(frozen=True)
class BadRow:
    where: str  # "line 7" or "record 12"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Examples:
    """Rows of one source, normalized to trl's columns (text | prompt, completion | messages)."""

    source: str
    format: str
    detected: bool  # False when forced with --format
    rows: list
    total_rows: int
    bad_rows: list = field(default_factory=list)


@dataclass(frozen=True)
class LengthStats:
    """Token lengths of the training rows as trl will tokenize them."""

    count: int
    mean: float
    p50: int
    p99: int
    max: int
    max_seq_len: int
    over_max_seq_len: int  # rows longer than max_seq_len: truncated

    def seq_len_for_plan(self, basis: str = "max") -> int:
        """The longest a micro-batch gets (batches pad to their longest row), capped by truncation."""
        return max(1, min(self.max if basis == "max" else self.p99, self.max_seq_len))


@dataclass
class DataReport:
    train: Examples
    eval_rows: list
    eval_source: str  # "10% held out of the training file", a file, or "none"
    lengths: LengthStats
    seq_len_basis: str  # max | p99
    seq_len: int  # handed to the planner
    row_lengths: list = field(default_factory=list)  # tokens of each training row (before truncation)

    def to_json(self) -> dict:
        t = self.train
        return {"source": t.source, "format": t.format, "format_detected": t.detected, "rows": t.total_rows,
                "bad_rows": len(t.bad_rows), "bad_rows_shown": [str(b) for b in t.bad_rows[:BAD_ROWS_SHOWN]],
                "train_rows": len(t.rows), "eval_rows": len(self.eval_rows), "eval_source": self.eval_source,
                "token_lengths": vars(self.lengths), "seq_len_basis": self.seq_len_basis, "seq_len": self.seq_len}


# --------------------------------------------------------------------------- reading


def read_records(source: str, split: str = "train") -> list[tuple[str, object]]:
    """SOURCE -> [(where, record)], where a record is whatever the row holds (a bad one too)."""
    text = str(source).strip()
    if not text:
        raise VramfitError("DATA is empty: give a JSONL/JSON/CSV/Parquet file, a save_to_disk folder or a hub dataset")
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_disk_folder(path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise VramfitError(f"{path}: unknown data file type '{suffix}'; use {', '.join(FILE_SUFFIXES)}")
        try:
            return readers[suffix](path)
        except UnicodeDecodeError as exc:
            raise VramfitError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise VramfitError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() in FILE_SUFFIXES or text.startswith((".", "/", "~")):
        raise VramfitError(f"no such data file: {path}")
    return _read_hub(text, split)


def _read_jsonl(path: Path) -> list:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                out.append((f"line {n}", _Unparsed(f"not valid JSON ({exc.msg})")))
    return out


def _read_json(path: Path) -> list:
    """A JSON array of objects (each located by its line), an object holding one such array, or
    JSON Lines saved as .json."""
    raw = path.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line
            return _read_jsonl(path)
        raise VramfitError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise VramfitError(f"{path}: expected a JSON array of rows (or an object holding one array), "
                               f"got an object with keys {', '.join(list(data)[:8])}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise VramfitError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    lines = _array_item_lines(raw, len(data))
    return [(f"line {lines[i]}" if lines else f"record {i + 1}", row) for i, row in enumerate(data)]


def _array_item_lines(raw: str, count: int) -> list[int] | None:
    """Line of each item of the (first) top-level JSON array, found by decoding item by item."""
    decoder = json.JSONDecoder()
    i = raw.find("[")
    if i < 0:
        return None
    lines, i = [], i + 1
    try:
        while len(lines) < count:
            while raw[i] in " \t\r\n,":
                i += 1
            lines.append(raw.count("\n", 0, i) + 1)
            _, i = decoder.raw_decode(raw, i)
    except (IndexError, json.JSONDecodeError):
        return None
    return lines


def _read_csv(path: Path) -> list:
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:  # reads the header
            return out
        start = reader.line_num + 1
        for row in reader:  # a quoted cell may span lines: a row starts after the previous one ends
            out.append((f"line {start}", row))
            start = reader.line_num + 1
    return out


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's errors: corrupt or not Parquet
        raise VramfitError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None
    return [(f"record {i + 1}", r) for i, r in enumerate(rows)]


def _pick_split(ds, split: str, where: str):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise VramfitError(f"{where} has no split '{split}'; it has: {', '.join(ds)}")
        ds = ds[split]
    return [(f"record {i + 1}", r) for i, r in enumerate(ds)]


def _read_disk_folder(path: Path, split: str) -> list:
    if not any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise VramfitError(f"{path} is a folder but not a datasets.save_to_disk folder (no dataset_info.json, "
                           f"state.json or dataset_dict.json); give the data file inside it")
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for damaged folders
        raise VramfitError(f"cannot load the dataset folder {path}: {str(exc).splitlines()[0][:200]}") from None
    return _pick_split(ds, split, str(path))


def _read_hub(name: str, split: str) -> list:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown, gated: all the user's to fix
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise VramfitError(f"'{name}' is not a local file or folder, and loading it as a hub dataset failed "
                           f"({msg}). Offline? Give a local JSONL/JSON/CSV/Parquet file instead.") from None
    return [(f"record {i + 1}", r) for i, r in enumerate(ds)]


class _Unparsed:
    """A row that could not be parsed at all (a broken JSONL line): always bad."""

    def __init__(self, reason: str):
        self.reason = reason


# --------------------------------------------------------------------------- formats


def detect_format(records: list) -> str:
    """The format most of the first rows have the columns of."""
    votes = dict.fromkeys(FORMATS, 0)
    seen: set = set()
    for _, rec in records[:DETECT_ROWS]:
        if isinstance(rec, dict):
            seen.update(rec)
            for fmt, cols in REQUIRED.items():
                if all(c in rec for c in cols):
                    votes[fmt] += 1
                    break
    best = max(FORMATS, key=lambda f: votes[f])
    if votes[best] == 0:
        cols = ", ".join(sorted(seen)[:12]) or "none"
        raise VramfitError(f"cannot tell the data format from its columns ({cols}); expected messages, "
                           f"prompt + completion, instruction + output (Alpaca) or text; or force it with --format")
    return best


def _string(rec: dict, key: str, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    v = rec[key]
    if not isinstance(v, str):
        raise ValueError(f"field '{key}' must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise ValueError(f"field '{key}' is empty")
    return v


def _messages(rec: dict) -> list:
    msgs = rec.get("messages")
    if msgs is None:
        raise ValueError("missing field 'messages'")
    if isinstance(msgs, str):  # CSV cells hold the list as JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise ValueError("field 'messages' is a string that is not a JSON list") from None
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("field 'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i + 1} must have a string 'role' and a string 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i + 1} has role '{m['role']}'; valid: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise ValueError("no assistant message with content: nothing to learn")
    return out


def normalize(rec, fmt: str) -> dict:
    """One record -> trl's columns for `fmt`; ValueError(reason) for a bad row."""
    if isinstance(rec, _Unparsed):
        raise ValueError(rec.reason)
    if not isinstance(rec, dict):
        raise ValueError(f"row must be an object, got {type(rec).__name__}")
    if fmt == "text":
        return {"text": _string(rec, "text")}
    if fmt == "prompt-completion":
        return {"prompt": _string(rec, "prompt"), "completion": _string(rec, "completion")}
    if fmt == "alpaca":
        instruction, output = _string(rec, "instruction"), _string(rec, "output")
        extra = _string(rec, "input", required=False)
        template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
        return {"prompt": template.format(instruction=instruction, input=extra), "completion": output}
    return {"messages": _messages(rec)}


def load_examples(source: str, fmt: str = "auto", on_bad_row: str = "skip", split: str = "train") -> Examples:
    """Read SOURCE, detect (or take) its format, normalize every row, and deal with the bad ones."""
    if fmt != "auto" and fmt not in FORMATS:
        raise VramfitError(f"unknown data format '{fmt}'; valid: auto, {', '.join(FORMATS)}")
    if on_bad_row not in ("skip", "fail"):
        raise VramfitError(f"--on-bad-row must be skip or fail, got '{on_bad_row}'")
    records = read_records(source, split)
    if not records:
        raise VramfitError(f"{source} holds no rows")
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(records)
    rows, bad = [], []
    for where, rec in records:
        try:
            rows.append(normalize(rec, fmt))
        except ValueError as exc:
            bad.append(BadRow(where, str(exc)))
    if bad and on_bad_row == "fail":
        shown = "; ".join(str(b) for b in bad[:BAD_ROWS_SHOWN])
        more = f" (and {len(bad) - BAD_ROWS_SHOWN} more)" if len(bad) > BAD_ROWS_SHOWN else ""
        raise VramfitError(f"{source}: {len(bad)} of {len(records)} rows are bad for format {fmt}: {shown}{more}; "
                           f"fix them or pass --on-bad-row skip")
    if not rows:
        raise VramfitError(f"{source}: none of its {len(records)} rows is valid for format {fmt} "
                           f"(first: {bad[0]})")
    return Examples(source=str(source), format=fmt, detected=detected, rows=rows, total_rows=len(records),
                    bad_rows=bad)


def split_validation(rows: list, val_split: float, seed: int = 42) -> tuple[list, list]:
    """Hold out a fraction of the rows (a seeded shuffle), at least one when the fraction is > 0."""
    if not 0.0 <= val_split < 1.0:
        raise VramfitError(f"--val-split must be in [0, 1), got {val_split}")
    if val_split == 0 or len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * val_split)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# --------------------------------------------------------------------------- token lengths


def _ids(encoded) -> list:
    """apply_chat_template(tokenize=True) returns ids or a dict of them depending on the version."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        return encoded["input_ids"]
    return encoded


def token_lengths(rows: list, fmt: str, tokenizer, batch: int = 1000) -> list[int]:
    """Tokens per row as trl builds the sequence: the text (or prompt + completion) and an EOS
    appended; a conversation as the chat template renders it."""
    if fmt == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise VramfitError("the data is chat messages but the tokenizer has no chat template; give a tokenizer "
                               "with one (--tokenizer) or use --format text")
        return [len(_ids(tokenizer.apply_chat_template(r["messages"], tokenize=True))) for r in rows]
    texts = [r["text"] if fmt == "text" else r["prompt"] + r["completion"] for r in rows]
    eos = 1 if tokenizer.eos_token_id is not None else 0
    out = []
    for i in range(0, len(texts), batch):
        out += [len(ids) + eos for ids in tokenizer(texts[i:i + batch])["input_ids"]]
    return out


def length_stats(lengths: list[int], max_seq_len: int) -> LengthStats:
    if max_seq_len <= 0:
        raise VramfitError(f"--max-seq-len must be a positive integer, got {max_seq_len}")
    ordered = sorted(lengths)

    def pct(q: float) -> int:  # nearest rank
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return LengthStats(count=len(ordered), mean=sum(ordered) / len(ordered), p50=pct(0.5), p99=pct(0.99),
                       max=ordered[-1], max_seq_len=max_seq_len,
                       over_max_seq_len=sum(1 for n in ordered if n > max_seq_len))


# --------------------------------------------------------------------------- the whole step


def prepare(source: str, tokenizer, fmt: str = "auto", on_bad_row: str = "skip",
            val_split: float = DEFAULT_VAL_SPLIT, val_file: str | None = None, max_seq_len: int = 2048,
            seq_len_basis: str = "max", seed: int = 42) -> DataReport:
    """Everything about the data that can go wrong, found before the model is loaded."""
    if seq_len_basis not in SEQ_LEN_BASES:
        raise VramfitError(f"--seq-len-from must be max or p99, got '{seq_len_basis}'")
    train = load_examples(source, fmt, on_bad_row)
    if val_file:
        held = load_examples(val_file, train.format, on_bad_row)
        eval_rows, eval_source = held.rows, str(val_file)
    else:
        train.rows, eval_rows = split_validation(train.rows, val_split, seed)
        eval_source = f"{val_split:.0%} held out of the training data" if eval_rows else "none"
    row_lengths = token_lengths(train.rows, train.format, tokenizer)
    stats = length_stats(row_lengths, max_seq_len)
    return DataReport(train=train, eval_rows=eval_rows, eval_source=eval_source, lengths=stats,
                      seq_len_basis=seq_len_basis, seq_len=stats.seq_len_for_plan(seq_len_basis),
                      row_lengths=row_lengths)


def to_hf_dataset(rows: list):
    """Normalized rows -> datasets.Dataset (what SFTTrainer takes)."""
    from datasets import Dataset

    return Dataset.from_list(rows)
