"""prefalign.data: every format and file type, chat templates, implicit prompts, truncation,
collation layout, the KTO KL batch and the length-grouped sampler. No network: the tokenizer
is trained here on a few sentences."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE, trained_word_tokenizer
from transformers import PreTrainedTokenizerFast

from prefalign.data import (
    DataError,
    PreferenceRecord,
    PromptCompletionRecord,
    TokenizedExample,
    TokenizedPair,
    TokenizedUnpaired,
    UnpairedRecord,
    collate_pairs,
    collate_unpaired,
    load_preference_data,
    load_sft_data,
    load_unpaired_data,
    split_common_prefix,
    tokenize_preference,
    tokenize_sft,
    tokenize_unpaired,
)
from prefalign.logprobs import split_pairs
from prefalign.training.loop import batch_plan

CORPUS = [
    "one two three four five six seven eight nine ten",
    "Q: is the film good ? A: yes it is great no it is bad",
    "<|user|> <|assistant|> <|system|> hello hi there good bad",
]


def make_tokenizer(bos: bool = True, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    return trained_word_tokenizer(CORPUS, bos, chat_template)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat_template=CHAT_TEMPLATE)


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Strings that trip naive CSV/JSON handling: commas, quotes, newlines, non-ASCII, leading spaces.
PAIRS = [
    {"prompt": "Q: is the film good?", "chosen": ' yes, it is "great"', "rejected": " no"},
    {"prompt": "line one\nline two", "chosen": "café ✓", "rejected": "naïve\ttab"},
    {"prompt": "", "chosen": "unconditional", "rejected": "text"},
]
UNPAIRED = [
    {"prompt": "hi", "completion": "hello there", "label": True},
    {"prompt": "hi, you", "completion": 'go "away"', "label": False},
]
SFT = [{"prompt": "Q: one?", "completion": " two"}, {"prompt": "α", "completion": "β\nγ"}]


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format named by the path's suffix (or a saved `datasets` directory)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(
                f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ","
            )
            writer.writeheader()
            writer.writerows(
                {k: str(v).lower() if isinstance(v, bool) else v for k, v in r.items()}
                for r in rows
            )
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train": ds}) if suffix == ".dict" else ds).save_to_disk(str(path))
    return path


FILE_NAMES = ["d.jsonl", "d.json", "d.csv", "d.tsv", "d.parquet", "saved_ds", "saved.dict"]


@pytest.mark.parametrize("name", FILE_NAMES)
def test_every_file_type_round_trips_to_the_same_records(tmp_path: Path, name: str) -> None:
    pref = load_preference_data(write(tmp_path / f"p_{name}", PAIRS))
    assert [(r.prompt, r.chosen, r.rejected, r.line) for r in pref.records] == [
        (r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(PAIRS, 1)
    ]
    assert all(r.source == str(tmp_path / f"p_{name}") for r in pref.records)
    unpaired = load_unpaired_data(write(tmp_path / f"u_{name}", UNPAIRED))
    assert [(r.prompt, r.completion, r.label) for r in unpaired.records] == [
        (r["prompt"], r["completion"], r["label"]) for r in UNPAIRED
    ]
    assert all(type(r.label) is bool for r in unpaired.records)
    sft = load_sft_data(write(tmp_path / f"s_{name}", SFT))
    assert [(r.prompt, r.completion) for r in sft.records] == [
        (r["prompt"], r["completion"]) for r in SFT
    ]
    assert not pref.skipped and not unpaired.skipped and not sft.skipped


def test_jsonl_names_lines_and_skips_blank_ones(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(PAIRS[0]).encode()
        + b"\n\n  \n"
        + json.dumps(PAIRS[1]).encode()
    )
    result = load_preference_data(path)  # BOM, blank lines and a missing final newline are fine
    assert [r.line for r in result.records] == [1, 4]
    assert result.summary() == f"{path}: 2 records"


def test_only_an_hf_id_is_routed_to_load_dataset(monkeypatch, tmp_path: Path) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_preference_data("hf:someone/prefs", split="test")
    assert calls == [("someone/prefs", "test")]
    assert result.records[0].source == "hf:someone/prefs[test]"
    assert len(result.records) == len(PAIRS)
    with pytest.raises(DataError, match="no such file"):
        load_preference_data(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_preference_data("./relative/name")
    # A bare name is never sent to the hub unasked: a typo must not reach the network.
    for bare in ("mydataset", "someone/prefs"):
        with pytest.raises(
            DataError,
            match=rf"^{bare}: no such file or directory "
            rf"\(a Hugging Face Hub dataset\? write hf:{bare}\)$",
        ):
            load_preference_data(bare)
    assert len(calls) == 1


def test_datasets_dict_picks_the_split(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS[:1]), "test": datasets.Dataset.from_list(PAIRS)}
    ).save_to_disk(str(path))
    assert len(load_preference_data(path, split="test").records) == len(PAIRS)
    with pytest.raises(DataError, match="no split 'validation' \\(splits: train, test\\)"):
        load_preference_data(path, split="validation")


def test_conversational_rows_render_through_the_chat_template(tmp_path: Path, chat_tok) -> None:
    user = [{"role": "user", "content": "hi"}]
    rows = [
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    ]
    (rec,) = load_preference_data(write(tmp_path / "c.jsonl", rows), tokenizer=chat_tok).records
    assert (rec.prompt, rec.chosen, rec.rejected) == ("<|user|> hi <|assistant|> ", "good ", "bad ")
    # the same rows through parquet (lists of structs) give the same texts
    (rec2,) = load_preference_data(write(tmp_path / "c.parquet", rows), tokenizer=chat_tok).records
    assert (rec2.prompt, rec2.chosen, rec2.rejected) == (rec.prompt, rec.chosen, rec.rejected)

    kto = [
        {"prompt": user, "completion": [{"role": "assistant", "content": "hello"}], "label": False}
    ]
    (u,) = load_unpaired_data(write(tmp_path / "k.jsonl", kto), tokenizer=chat_tok).records
    assert (u.prompt, u.completion, u.label) == ("<|user|> hi <|assistant|> ", "hello ", False)

    sft = [
        {
            "messages": [
                {"role": "system", "content": "there"},
                *user,
                {"role": "assistant", "content": "hello"},
            ]
        }
    ]
    (s,) = load_sft_data(write(tmp_path / "s.jsonl", sft), tokenizer=chat_tok).records
    assert (s.prompt, s.completion) == ("<|system|> there <|user|> hi <|assistant|> ", "hello ")


def test_chat_template_eos_is_not_doubled_and_bos_not_doubled(tmp_path: Path) -> None:
    template = "<s>" + CHAT_TEMPLATE.replace(
        "{{ m['content'] }} ",
        "{{ m['content'] }} {% if m['role'] == 'assistant' %}</s> {% endif %}",
    )
    tokenizer = make_tokenizer(chat_template=template)
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    ]
    records = load_preference_data(write(tmp_path / "c.jsonl", rows), tokenizer=tokenizer).records
    assert records[0].chosen == "good </s> "
    (pair,), _ = tokenize_preference(records, tokenizer, max_length=64, max_prompt_length=32)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert pair.prompt_ids == [bos, *ids(tokenizer, "<|user|> hi <|assistant|>")]
    assert pair.chosen_ids == [*ids(tokenizer, "good"), eos]


def test_implicit_prompt_is_the_common_prefix_cut_at_a_word_boundary(
    tmp_path: Path, chat_tok
) -> None:
    assert split_common_prefix("Q: is it good? A: yes it is", "Q: is it good? A: no") == (
        "Q: is it good? A:",
        " yes it is",
        " no",
    )
    # never split a word: "great"/"good" share "g", the prompt must not end in it
    assert split_common_prefix("The film is good", "The film is great") == (
        "The film is",
        " good",
        " great",
    )
    assert split_common_prefix("x = 1", "x = 12") == ("x =", " 1", " 12")
    assert split_common_prefix("<|assistant|>good", "<|assistant|>bad") == (
        "<|assistant|>",
        "good",
        "bad",
    )

    rows = [{"chosen": "Q: is the film good ? A: yes", "rejected": "Q: is the film good ? A: no"}]
    (rec,) = load_preference_data(write(tmp_path / "i.jsonl", rows)).records
    assert (rec.prompt, rec.chosen, rec.rejected) == ("Q: is the film good ? A:", " yes", " no")

    user = {"role": "user", "content": "hi"}
    conv = [
        {
            "chosen": [user, {"role": "assistant", "content": "good"}],
            "rejected": [user, {"role": "assistant", "content": "bad"}],
        }
    ]
    (rec,) = load_preference_data(write(tmp_path / "ic.jsonl", conv), tokenizer=chat_tok).records
    assert (rec.prompt, rec.chosen, rec.rejected) == ("<|user|> hi <|assistant|> ", "good ", "bad ")


def record(prompt: str, chosen: str, rejected: str, line: int = 1) -> PreferenceRecord:
    return PreferenceRecord(prompt, chosen, rejected, "mem.jsonl", line)


TEN = "one two three four five six seven eight nine ten"


@pytest.mark.parametrize(
    "truncation, kept",
    [("keep_end", "eight nine ten"), ("keep_start", "one two three")],
)
def test_prompt_truncation_modes_keep_exact_tokens_and_bos(tok, truncation: str, kept: str) -> None:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    (pair,), skipped = tokenize_preference(
        [record(TEN, "yes it is great", "no")],
        tok,
        max_length=8,
        max_prompt_length=4,
        truncation=truncation,
    )
    # 4 prompt tokens, BOS kept in both modes (keep_start keeps it as the first token)
    assert pair.prompt_ids == [bos, *ids(tok, kept)]
    # 8 - 4 prompt tokens leave 4: "yes it is great" + EOS is cut, keeping its start;
    # "no" + EOS fits
    assert pair.chosen_ids == ids(tok, "yes it is great")
    assert pair.rejected_ids == [*ids(tok, "no"), eos]
    assert pair.truncated and pair.length == 8 and skipped == Counter()


def test_no_truncation_when_everything_fits_and_eos_is_appended(tok) -> None:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    (pair,), _ = tokenize_preference(
        [record("one two", "yes", "no it is")], tok, max_length=None, max_prompt_length=None
    )
    assert pair == TokenizedPair(
        [bos, *ids(tok, "one two")], [*ids(tok, "yes"), eos], [*ids(tok, "no it is"), eos]
    )
    assert not pair.truncated
    (pair,), _ = tokenize_preference(
        [record("one two", "yes", "no")],
        tok,
        max_length=None,
        max_prompt_length=None,
        add_eos=False,
    )
    assert pair.chosen_ids == ids(tok, "yes") and pair.rejected_ids == ids(tok, "no")


def test_tokenizer_without_bos_adds_none(tok) -> None:
    plain = make_tokenizer(bos=False)
    (pair,), _ = tokenize_preference(
        [record("one two", "yes", "no")], plain, max_length=16, max_prompt_length=1
    )
    assert pair.prompt_ids == ids(plain, "two")


def test_unpaired_and_sft_share_the_layout(tok) -> None:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    (u,), _ = tokenize_unpaired(
        [UnpairedRecord(TEN, "yes it is", True, "m.jsonl", 1)],
        tok,
        max_length=6,
        max_prompt_length=3,
    )
    assert u == TokenizedUnpaired(
        [bos, *ids(tok, "nine ten")], ids(tok, "yes it is"), True, truncated=True
    )
    (s,), _ = tokenize_sft(
        [PromptCompletionRecord("one", "two", "m.jsonl", 1)], tok, max_length=6, max_prompt_length=3
    )
    assert s == TokenizedExample([bos, *ids(tok, "one")], [*ids(tok, "two"), eos])


def test_prompt_that_leaves_no_room_is_a_located_error_or_skipped(tok) -> None:
    records = [record("one", "yes", "no", line=1), record(TEN, "yes", "no", line=7)]
    with pytest.raises(DataError) as info:
        tokenize_preference(
            records, tok, max_length=6, max_prompt_length=6, truncation="keep_start"
        )
    assert str(info.value).startswith("mem.jsonl:7: field 'prompt': 6 prompt tokens leave no room")
    pairs, skipped = tokenize_preference(
        records, tok, max_length=6, max_prompt_length=6, skip_invalid=True
    )
    assert len(pairs) == 1 and skipped == Counter(no_room_for_response=1)
    with pytest.raises(ValueError, match="truncation must be"):
        tokenize_preference(records, tok, max_length=6, max_prompt_length=3, truncation="middle")


def test_collate_pairs_stacks_chosen_over_rejected_padded_to_the_batch_max() -> None:
    pairs = [TokenizedPair([1, 2], [3], [4, 5]), TokenizedPair([6], [7, 8, 9], [10])]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 0],  # chosen 0
        [6, 7, 8, 9],  # chosen 1
        [1, 2, 4, 5],  # rejected 0
        [6, 10, 0, 0],  # rejected 1
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 1, 1, 1],
        [1, 1, 0, 0],
    ]
    assert batch["loss_mask"].dtype == torch.bool
    assert batch["loss_mask"].int().tolist() == [
        [0, 0, 1, 0],
        [0, 1, 1, 1],
        [0, 0, 1, 1],
        [0, 1, 0, 0],
    ]
    # the halves split_pairs separates are the chosen and the rejected rows
    fake = type("L", (), {})()
    fake.sum, fake.n_tokens = batch["loss_mask"].sum(1).float(), batch["loss_mask"].sum(1)
    chosen, rejected = split_pairs(fake)
    assert chosen.n_tokens.tolist() == [1, 3] and rejected.n_tokens.tolist() == [2, 1]
    # padding goes only to the batch's own longest row
    assert collate_pairs(pairs[:1], pad_id=0)["input_ids"].shape == (2, 4)
    assert collate_pairs([TokenizedPair([1], [2], [3])], pad_id=0)["input_ids"].shape == (2, 2)


def test_collate_unpaired_builds_the_rotated_kl_batch() -> None:
    examples = [
        TokenizedUnpaired([1], [11, 12], True),
        TokenizedUnpaired([2, 3], [21], False),
        TokenizedUnpaired([4], [31, 32, 33], True),
    ]
    batch = collate_unpaired(examples, pad_id=0)
    assert batch["labels"].tolist() == [True, False, True] and batch["labels"].dtype == torch.bool
    assert batch["input_ids"].tolist() == [[1, 11, 12, 0], [2, 3, 21, 0], [4, 31, 32, 33]]
    # prompt i with completion (i + 1) mod B
    assert batch["kl_input_ids"].tolist() == [
        [1, 21, 0, 0, 0],
        [2, 3, 31, 32, 33],
        [4, 11, 12, 0, 0],
    ]
    assert batch["kl_loss_mask"].int().tolist() == [
        [0, 1, 0, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 1, 0, 0],
    ]
    assert batch["kl_attention_mask"].tolist() == [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]
    # a borrowed completion is cut to max_length
    assert collate_unpaired(examples, pad_id=0, max_length=4)["kl_input_ids"].tolist()[1] == [
        2,
        3,
        31,
        32,
    ]
    with pytest.raises(ValueError, match="at least 2 examples"):
        collate_unpaired(examples[:1], pad_id=0)


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_the_trainers_batch_plan_covers_each_index_once_and_cuts_padding() -> None:
    """The one batcher: `batch_plan` of the Trainer, used by every training method."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (1003,), generator=gen).tolist()
    batches = batch_plan(lengths, 8, seed=3, epoch=0, group_by_length=True)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 1000  # the last partial batch is dropped
    assert all(len(b) == 8 for b in batches)
    assert batches == batch_plan(lengths, 8, seed=3, epoch=0, group_by_length=True)
    assert batches != batch_plan(lengths, 8, seed=4, epoch=0, group_by_length=True)
    assert batches != batch_plan(lengths, 8, seed=3, epoch=1, group_by_length=True)
    random_batches = batch_plan(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert padding(lengths, batches) < 0.2 * padding(lengths, random_batches)
    # the order of batches stays random: not sorted by length
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_skip_invalid_counts_each_reason(tmp_path: Path) -> None:
    good = json.dumps(PAIRS[0])
    lines = [
        good,
        '{"prompt": "p", "chosen": 1, "rejected": "r"}',
        '{"prompt": "p", "chosen": "a", "rejected": "a"}',
        "{not json",
        '{"prompt": "p", "chosen": "a", "rejected": "b"}',
        '{"prompt": "p", "chosen": "a", "rejected": 2}',
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'chosen': expected a string, got int"):
        load_preference_data(path)
    result = load_preference_data(path, skip_invalid=True)
    assert [r.line for r in result.records] == [1, 5]
    assert result.skipped == Counter(not_string=2, identical_responses=1, bad_json=1)
    assert (
        result.summary()
        == f"{path}: 2 records, 4 skipped (bad_json: 1, identical_responses: 1, not_string: 2)"
    )
    path.write_text("\n".join(lines[1:4]))
    with pytest.raises(DataError, match="no valid records; all rows skipped"):
        load_preference_data(path, skip_invalid=True)


def test_batches_feed_a_dataloader(tok) -> None:
    records = [
        record(" ".join(["one two"] * i), " ".join(["yes"] * (i % 3 + 1)), "no", line=i)
        for i in range(1, 11)
    ]
    pairs, _ = tokenize_preference(records, tok, max_length=32, max_prompt_length=16)
    batches = batch_plan([p.length for p in pairs], 4, seed=0, epoch=0, group_by_length=True)
    loader = torch.utils.data.DataLoader(
        pairs, batch_sampler=batches, collate_fn=lambda b: collate_pairs(b, tok.pad_token_id)
    )
    seen = sum(batch["input_ids"].shape[0] for batch in loader)
    assert seen == 2 * (len(pairs) // 4 * 4)
