"""A catalogue of bad inputs: each must raise a one-line DataError naming file, line and field,
and with skip_invalid=True be skipped and counted under its reason (row-level problems) or
still raise (problems of the whole file, where there is no row to skip)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CHAT_TEMPLATE, trained_word_tokenizer
from transformers import PreTrainedTokenizerFast

from prefalign.data import (
    DataError,
    load_preference_data,
    load_sft_data,
    load_unpaired_data,
    tokenize_preference,
)

# Renders the generation prompt in front: the prompt is not a prefix of the whole conversation.
UNSTABLE_TEMPLATE = (
    "{% if add_generation_prompt %}ANSWER: {% endif %}"
    "{% for m in messages %}{{ m['content'] }} {% endfor %}"
)


def make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    return trained_word_tokenizer(["one two three four five six seven"], True, chat_template)


TOKENIZERS = {
    "plain": make_tokenizer(None),
    "chat": make_tokenizer(CHAT_TEMPLATE),
    "unstable": make_tokenizer(UNSTABLE_TEMPLATE),
}

# In-vocabulary responses: "a" and "b" would both be <unk>, a pair with no preference in it.
PAIR = json.dumps({"prompt": "p", "chosen": "one", "rejected": "two"})
KTO = json.dumps({"prompt": "p", "completion": "a", "label": True})
SFT = json.dumps({"prompt": "p", "completion": "a"})
USER = [{"role": "user", "content": "hi"}]
ASSISTANT = [{"role": "assistant", "content": "yes"}]
REFUSAL = [{"role": "assistant", "content": "no"}]
# A valid conversational pair: bad only for a tokenizer that cannot render it.
CONVERSATION = dict(prompt=USER, chosen=ASSISTANT, rejected=REFUSAL)
GOOD = {"preference": PAIR, "unpaired": KTO, "sft": SFT}
LOADERS = {"preference": load_preference_data, "unpaired": load_unpaired_data, "sft": load_sft_data}


@dataclass
class Case:
    """`bad` is the second row of a file whose first row is good; `content` replaces the file."""

    expected: str  # a substring of the error message
    # counted under this reason with skip_invalid; None: a whole-file problem, still raises
    reason: str | None
    bad: str | bytes = ""
    content: str | bytes | None = None
    file: str = "data.jsonl"
    kind: str = "preference"
    tokenizer: str | None = "plain"
    stage: str = "load"  # "tokenize": the rows load, tokenization rejects one
    options: dict = field(default_factory=dict)
    # The same problem through the command line, where `options` must make a valid config:
    # overrides for it, and the message expected then (default: `expected`).
    cli: tuple[str, ...] = ()
    cli_expected: str | None = None

    def file_content(self) -> bytes:
        if self.content is not None:
            return self.content if isinstance(self.content, bytes) else self.content.encode()
        bad = self.bad if isinstance(self.bad, bytes) else self.bad.encode()
        return GOOD[self.kind].encode() + b"\n" + bad + b"\n"


def row(**fields) -> str:
    return json.dumps(fields)


CASES = {
    # --- JSON Lines: the line itself
    "bad_json_line": Case(
        "data.jsonl:2: invalid JSON: Expecting value (column 44)",
        "bad_json",
        bad='{"prompt": "p", "chosen": "a", "rejected": }',
    ),
    "line_not_an_object": Case(
        "data.jsonl:2: expected a JSON object, got list", "not_object", bad='["p", "a", "b"]'
    ),
    "invalid_utf8": Case(
        "data.jsonl:2: invalid UTF-8 (byte 16 of the line)",
        "invalid_utf8",
        bad=b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',
    ),
    "unknown_format": Case(
        "data.jsonl:2: no recognised fields (got: question, answer)",
        "unknown_format",
        bad=row(question="q", answer="a"),
    ),
    # --- fields
    "missing_field": Case(
        "data.jsonl:2: field 'rejected': missing", "missing_field", bad=row(prompt="p", chosen="a")
    ),
    "non_string_field": Case(
        "data.jsonl:2: field 'chosen': expected a string, got int",
        "not_string",
        bad=row(prompt="p", chosen=3, rejected="b"),
    ),
    "null_field": Case(
        "data.jsonl:2: field 'prompt': is null",
        "null_field",
        bad=row(prompt=None, chosen="a", rejected="b"),
    ),
    "prompt_of_wrong_type": Case(
        "data.jsonl:2: field 'prompt': expected a string or a list of messages, got object",
        "not_string",
        bad=row(prompt={"text": "p"}, chosen="a", rejected="b"),
    ),
    "empty_response": Case(
        "data.jsonl:2: field 'rejected': empty or whitespace-only response",
        "empty_response",
        bad=row(prompt="p", chosen="a", rejected=" \n\t"),
    ),
    "identical_responses": Case(
        "data.jsonl:2: field 'rejected': identical to 'chosen'",
        "identical_responses",
        bad=row(prompt="p", chosen="same", rejected="same"),
    ),
    "mixed_string_and_messages": Case(
        "data.jsonl:2: field 'chosen': is a list of messages but 'prompt' is a string",
        "mixed_formats",
        bad=row(prompt="p", chosen=ASSISTANT, rejected="b"),
    ),
    # --- conversational
    "message_without_role": Case(
        "data.jsonl:2: field 'prompt[0]': message needs a string 'role', got missing",
        "bad_message",
        tokenizer="chat",
        bad=row(prompt=[{"content": "hi"}], chosen=ASSISTANT, rejected=REFUSAL),
    ),
    "message_content_not_string": Case(
        "data.jsonl:2: field 'chosen[0]': message needs a string 'content', got int",
        "bad_message",
        tokenizer="chat",
        bad=row(prompt=USER, chosen=[{"role": "assistant", "content": 5}], rejected=ASSISTANT),
    ),
    "empty_message_list": Case(
        "data.jsonl:2: field 'rejected': empty list of messages",
        "empty_response",
        tokenizer="chat",
        bad=row(prompt=USER, chosen=ASSISTANT, rejected=[]),
    ),
    "no_chat_template": Case(
        "data.jsonl:2: field 'prompt': conversational data needs a tokenizer with a chat template",
        "no_chat_template",
        tokenizer="plain",
        bad=row(**CONVERSATION),
    ),
    "no_tokenizer_at_all": Case(
        "data.jsonl:2: field 'prompt': conversational data needs a tokenizer",
        "no_chat_template",
        tokenizer=None,
        bad=row(**CONVERSATION),
    ),
    "template_not_prefix_stable": Case(
        "data.jsonl:2: field 'chosen': the chat template does not render the prompt as a prefix",
        "template_not_prefix",
        tokenizer="unstable",
        bad=row(**CONVERSATION),
    ),
    # --- implicit prompt
    "implicit_no_common_prefix": Case(
        "data.jsonl:2: field 'chosen': no common prompt",
        "no_common_prefix",
        bad=row(chosen="yes indeed", rejected="no way"),
    ),
    "implicit_identical": Case(
        "data.jsonl:2: field 'rejected': identical to 'chosen'",
        "identical_responses",
        bad=row(chosen="Q: x A: y", rejected="Q: x A: y"),
    ),
    "implicit_response_is_a_prefix": Case(
        "data.jsonl:2: field 'chosen': no response after the common prompt text",
        "empty_response",
        bad=row(chosen="Q: x A:", rejected="Q: x A: y"),
    ),
    # --- unpaired (KTO) labels
    "label_string_yes": Case(
        "data.jsonl:2: field 'label': expected a boolean (true = desirable, false = undesirable),"
        " got str 'yes'",
        "bad_label",
        kind="unpaired",
        bad=row(prompt="p", completion="a", label="yes"),
    ),
    "label_int_2": Case(
        "data.jsonl:2: field 'label': expected a boolean",
        "bad_label",
        kind="unpaired",
        bad=row(prompt="p", completion="a", label=2),
    ),
    "label_csv_maybe": Case(
        "data.csv:row 2: field 'label': expected a boolean",
        "bad_label",
        kind="unpaired",
        file="data.csv",
        content="prompt,completion,label\np,a,true\np,b,maybe\n",
    ),
    # --- SFT
    "sft_messages_end_with_user": Case(
        "data.jsonl:2: field 'messages': needs at least one prompt message followed by a final "
        "assistant message",
        "bad_message",
        kind="sft",
        tokenizer="chat",
        bad=row(messages=ASSISTANT + USER),
    ),
    "sft_empty_completion": Case(
        "data.jsonl:2: field 'completion': empty or whitespace-only response",
        "empty_response",
        kind="sft",
        bad=row(prompt="p", completion=""),
    ),
    # --- other file types: rows
    "json_row_not_an_object": Case(
        "data.json:row 2: expected a JSON object, got int",
        "not_object",
        file="data.json",
        content=f"[{PAIR}, 5]",
    ),
    "csv_row_short": Case(
        "data.csv:row 2: 2 cells but the header has 3 columns",
        "bad_csv_row",
        file="data.csv",
        content="prompt,chosen,rejected\np,a,b\np,a\n",
    ),
    "csv_empty_cell_response": Case(
        "data.csv:row 2: field 'chosen': empty or whitespace-only response",
        "empty_response",
        file="data.csv",
        content="prompt,chosen,rejected\np,a,b\np,,b\n",
    ),
    # --- tokenization stage
    "prompt_leaves_no_room": Case(
        "data.jsonl:2: field 'prompt': 5 prompt tokens leave no room for the response "
        "within max_length=5",
        "no_room_for_response",
        stage="tokenize",
        bad=row(prompt="one two three four five six seven", chosen="a", rejected="b"),
        options={"max_length": 5, "max_prompt_length": 5},
        cli=("data.max_length=5", "data.max_prompt_length=null"),
        cli_expected="data.jsonl:2: field 'prompt': 8 prompt tokens leave no room for the "
        "response within max_length=5",
    ),
    "identical_after_truncation": Case(
        "data.jsonl:2: field 'rejected': identical to 'chosen' once cut to max_length=4 "
        "(2 prompt + 2 response tokens); raise max_length",
        "identical_after_truncation",
        stage="tokenize",
        bad=row(prompt="one", chosen="two three four", rejected="two three five"),
        options={"max_length": 4, "max_prompt_length": 2},
        cli=("data.max_length=4", "data.max_prompt_length=2"),
    ),
    # Different texts, the same ids with nothing cut: "eight" and "nine" are both <unk> here.
    "identical_token_ids": Case(
        "data.jsonl:2: field 'rejected': tokenizes to the same 3 ids as 'chosen' (no truncation): "
        "the pair carries no preference",
        "identical_token_ids",
        stage="tokenize",
        bad=row(prompt="one", chosen="two eight", rejected="two nine"),
        options={"max_length": 64, "max_prompt_length": 16},
    ),
    "unknown_role": Case(
        "data.jsonl:2: field 'prompt[0]': unknown role 'human'; allowed: system, developer, "
        "user, assistant, tool (ShareGPT's 'human' is 'user')",
        "bad_role",
        tokenizer="chat",
        bad=row(prompt=[{"role": "human", "content": "hi"}], chosen=ASSISTANT, rejected=REFUSAL),
    ),
    "lone_surrogate": Case(
        "data.jsonl:2: string holds a lone UTF-16 surrogate (\\ud800), which is not text",
        "bad_string",
        bad='{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}',
    ),
    "lone_surrogate_json_file": Case(
        "data.json:row 2: string holds a lone UTF-16 surrogate (\\udfff)",
        "bad_string",
        file="data.json",
        content="[" + PAIR + ', {"prompt": "p", "chosen": "\\udfff", "rejected": "b"}]',
    ),
    "deeply_nested_line": Case(
        "data.jsonl:2: JSON nested deeper than 64 levels",
        "too_deep",
        bad='{"prompt": ' + "[" * 50_000 + "]" * 50_000 + ', "chosen": "a", "rejected": "b"}',
    ),
    "five_thousand_digit_number": Case(
        "data.jsonl:2: number too long to read (Exceeds the limit (4300 digits)",
        "bad_number",
        bad='{"prompt": "p", "chosen": ' + "7" * 5000 + ', "rejected": "b"}',
    ),
    # --- whole-file problems: nothing to skip, so skip_invalid still raises
    "empty_file": Case("data.jsonl: empty file: no records", None, content=""),
    "only_blank_lines": Case("data.jsonl: empty file: no records", None, content="\n  \n\n"),
    "empty_json_list": Case(
        "data.json: empty file: no records", None, file="data.json", content="[]"
    ),
    "csv_header_only": Case(
        "data.csv: empty file: no records",
        None,
        file="data.csv",
        content="prompt,chosen,rejected\n",
    ),
    "json_not_a_list": Case(
        "data.json: expected a JSON list of objects at the top level, got object",
        None,
        file="data.json",
        content=PAIR,
    ),
    "json_lines_named_json": Case(
        "data.json: invalid JSON on line 2: Extra data (one object per line? name the file .jsonl)",
        None,
        file="data.json",
        content=PAIR + "\n" + PAIR,
    ),
    "json_invalid_utf8": Case(
        "data.json: invalid UTF-8 on line 2",
        None,
        file="data.json",
        content=b'[\n{"prompt": "caf\xe9"}]',
    ),
    "csv_missing_column": Case(
        "data.csv: field 'rejected': missing column (columns: prompt, chosen)",
        None,
        file="data.csv",
        content="prompt,chosen\np,a\n",
    ),
    "csv_unknown_columns": Case(
        "data.csv: no recognised columns (columns: question, answer)",
        None,
        file="data.csv",
        content="question,answer\nq,a\n",
    ),
    "kto_csv_missing_label": Case(
        "data.csv: field 'label': missing column",
        None,
        kind="unpaired",
        file="data.csv",
        content="prompt,completion\np,a\n",
    ),
    "deeply_nested_json_file": Case(
        "data.json: JSON nested deeper than 64 levels",
        None,
        file="data.json",
        content="[" * 100_000 + "]" * 100_000,
    ),
    "unknown_file_type": Case(
        "data.txt: unknown file type '.txt'", None, file="data.txt", content=PAIR
    ),
    "all_rows_invalid": Case(
        "data.jsonl:1: field 'chosen': expected a string",
        None,
        content=row(prompt="p", chosen=1, rejected="b") + "\n",
    ),
}


def run_case(case: Case, path: Path, skip_invalid: bool):
    tokenizer = TOKENIZERS[case.tokenizer] if case.tokenizer else None
    result = LOADERS[case.kind](path, tokenizer=tokenizer, skip_invalid=skip_invalid)
    if case.stage == "load":
        return result.records, result.skipped
    return tokenize_preference(result.records, tokenizer, skip_invalid=skip_invalid, **case.options)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_located_one_line_error(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    path = tmp_path / case.file
    path.write_bytes(case.file_content())
    with pytest.raises(DataError) as info:
        run_case(case, path, skip_invalid=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path) + "/")
    assert case.expected in message, message

    if case.reason is None:  # a problem of the whole file: skipping cannot help
        with pytest.raises(DataError):
            run_case(case, path, skip_invalid=True)
        return
    assert info.value.reason == case.reason
    records, skipped = run_case(case, path, skip_invalid=True)
    assert len(records) == 1  # the good first row survives
    assert skipped == Counter({case.reason: 1})


def test_the_catalogue_covers_enough_distinct_problems() -> None:
    assert len(CASES) >= 15
    assert len({c.reason for c in CASES.values() if c.reason}) >= 15


def test_held_out_pairs_are_checked_like_training_data(tmp_path: Path) -> None:
    """Eval pairs used to be skipped silently whatever the config said."""
    from prefalign.evaluation.pairs import load_eval_pairs
    from prefalign.training.preference import PreferenceData

    path = tmp_path / "eval.jsonl"
    path.write_text(PAIR + "\n" + row(prompt="p", chosen=3, rejected="b") + "\n")
    with pytest.raises(DataError, match=r"eval.jsonl:2: field 'chosen': expected a string"):
        load_eval_pairs(TOKENIZERS["plain"], str(path), PreferenceData())
    printed = []
    pairs = load_eval_pairs(
        TOKENIZERS["plain"], str(path), PreferenceData(skip_invalid=True), log=printed.append
    )
    assert len(pairs) == 1
    assert printed == [f"skipped 1 invalid rows of {path}: {{'not_string': 1}}"]
