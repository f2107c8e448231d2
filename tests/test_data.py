"""Training data: sources, format detection, bad rows by line, the split, and token lengths."""

import json

import pytest

from vramfit import VramfitError
from vramfit.run.data import (
    ALPACA_PROMPT_NO_INPUT,
    detect_format,
    length_stats,
    load_examples,
    prepare,
    read_records,
    split_validation,
    token_lengths,
)

from tiny_lm import alpaca_rows, chat_rows, make_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer()
    t.pad_token = t.eos_token
    return t


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}, "messages"),
    ({"prompt": "sky is", "completion": "blue"}, "prompt-completion"),
    ({"instruction": "tell me", "input": "", "output": "no"}, "alpaca"),
    ({"text": "the cat sat"}, "text"),
])
def test_each_format_is_detected_from_its_columns(tmp_path, row, fmt):
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [row] * 3))
    assert (ex.format, ex.detected, len(ex.rows)) == (fmt, True, 3)


def test_alpaca_becomes_prompt_completion_with_the_alpaca_prompt(tmp_path):
    rows = [{"instruction": "add two", "output": "four"}, {"instruction": "add", "input": "two two", "output": "4"}]
    ex = load_examples(write_jsonl(tmp_path / "a.jsonl", rows))
    assert ex.rows[0] == {"prompt": ALPACA_PROMPT_NO_INPUT.format(instruction="add two"), "completion": "four"}
    assert "### Input:\ntwo two\n\n### Response:\n" in ex.rows[1]["prompt"]


def test_forced_format_overrides_detection(tmp_path):
    rows = [{"text": "the cat", "prompt": "a", "completion": "b"}] * 2
    assert load_examples(write_jsonl(tmp_path / "d.jsonl", rows)).format == "prompt-completion"
    ex = load_examples(str(tmp_path / "d.jsonl"), fmt="text")
    assert (ex.format, ex.detected, ex.rows[0]) == ("text", False, {"text": "the cat"})


def test_bad_rows_are_reported_by_line_and_skipped(tmp_path):
    lines = ['{"prompt": "a", "completion": "b"}', '{"prompt": "a"', '', '{"prompt": "a", "completion": 3}',
             '{"prompt": "a", "completion": "  "}', '{"completion": "b"}', '[1, 2]', '{"prompt": "c", "completion": "d"}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ex = load_examples(str(path), fmt="prompt-completion")
    assert len(ex.rows) == 2 and ex.total_rows == 7
    assert [str(b) for b in ex.bad_rows] == [
        "line 2: not valid JSON (Expecting ',' delimiter)", "line 4: field 'completion' must be a string, got int",
        "line 5: field 'completion' is empty", "line 6: missing field 'prompt'", "line 7: row must be an object, got list"]


def test_on_bad_row_fail_names_the_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": ""}, {"text": None}])
    with pytest.raises(VramfitError, match=r"2 of 3 rows are bad .*line 2: field 'text' is empty; line 3: missing"):
        load_examples(path, on_bad_row="fail")


def test_chat_rows_need_roles_strings_and_an_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": 5}]}, {"messages": []}, chat_rows(1)[0]]
    ex = load_examples(write_jsonl(tmp_path / "c.jsonl", rows))
    assert len(ex.rows) == 1
    assert [b.reason for b in ex.bad_rows] == [
        "no assistant message with content: nothing to learn", "message 1 has role 'robot'; valid: system, user, "
        "assistant, tool", "message 1 must have a string 'role' and a string 'content'",
        "field 'messages' must be a non-empty list of {role, content}"]


def test_json_array_rows_are_located_by_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": 1},\n\n  {"text": "c"}\n]\n')
    ex = load_examples(str(path))
    assert [str(b) for b in ex.bad_rows] == ["line 3: field 'text' must be a string, got int"]


def test_csv_rows_are_located_by_line_even_after_a_multiline_cell(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"two\nlines",,yes\nhello,,\nsky,,blue\n')
    ex = load_examples(str(path))
    assert ex.format == "alpaca" and len(ex.rows) == 2
    assert [str(b) for b in ex.bad_rows] == ["line 4: field 'output' is empty"]


def test_parquet_and_save_to_disk_folders_are_read(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(alpaca_rows(5))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_examples(str(tmp_path / "d.parquet")).rows) == 5
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_examples(str(tmp_path / "saved")).rows) == 5
    with pytest.raises(VramfitError, match="no split 'validation'; it has: train, test"):
        read_records(str(tmp_path / "saved"), split="validation")


def test_missing_and_unreadable_sources_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(VramfitError, match="no such data file"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(VramfitError, match="unknown data file type '.txt'"):
        read_records(str(tmp_path / "d.txt"))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(VramfitError, match="not UTF-8"):
        read_records(str(tmp_path / "bin.jsonl"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(VramfitError, match="not a datasets.save_to_disk folder"):
        read_records(str(tmp_path / "folder"))

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(VramfitError, match="loading it as a hub dataset failed .no network"):
        read_records("someone/some-dataset")


def test_undetectable_columns_are_named(tmp_path):
    with pytest.raises(VramfitError, match=r"columns \(answer, question\)"):
        detect_format([("line 1", {"question": "q", "answer": "a"})])


def test_validation_split_holds_out_a_seeded_tenth(tmp_path):
    rows = list(range(50))
    train, held = split_validation(rows, 0.1, seed=1)
    assert len(held) == 5 and sorted(train + held) == rows
    assert split_validation(rows, 0.1, seed=1) == (train, held)
    assert split_validation(rows, 0.0) == (rows, [])
    assert len(split_validation([1, 2], 0.1)[1]) == 1


def test_token_lengths_count_eos_and_the_chat_template(tok):
    assert token_lengths([{"text": "the cat sat"}], "text", tok) == [4]
    assert token_lengths([{"prompt": "the cat", "completion": " sat"}], "prompt-completion", tok) == [4]
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes no"}]
    assert token_lengths([{"messages": msgs}], "messages", tok) == [6]  # <|user|> hello <|assistant|> yes no <eos>


def test_length_stats_p99_max_and_rows_over_the_limit():
    s = length_stats(list(range(1, 101)) + [500], max_seq_len=90)
    assert (s.count, s.p50, s.p99, s.max, s.over_max_seq_len) == (101, 51, 100, 500, 11)
    assert s.seq_len_for_plan("max") == 90 and s.seq_len_for_plan("p99") == 90
    assert length_stats([10, 20], 64).seq_len_for_plan("max") == 20


def test_prepare_reports_lengths_before_training_and_uses_a_validation_file(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", alpaca_rows(20) + [{"instruction": "", "output": "x"}])
    val = write_jsonl(tmp_path / "v.jsonl", alpaca_rows(3, seed=9))
    d = prepare(train, tok, val_file=val, max_seq_len=32, seq_len_basis="p99")
    assert (len(d.train.rows), len(d.eval_rows), len(d.train.bad_rows)) == (20, 3, 1)
    assert d.seq_len == min(d.lengths.p99, 32) and d.lengths.over_max_seq_len == sum(
        n > 32 for n in token_lengths(d.train.rows, "alpaca", tok))
    j = d.to_json()
    assert j["bad_rows_shown"] == ["line 21: field 'instruction' is empty"] and j["eval_source"] == val
    json.dumps(j)


def test_chat_data_without_a_chat_template_is_refused(tmp_path):
    plain = make_tokenizer(chat_template=False)
    with pytest.raises(VramfitError, match="no chat template"):
        prepare(write_jsonl(tmp_path / "c.jsonl", chat_rows(4)), plain)
