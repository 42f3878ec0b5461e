"""Tokenize records into prompt and response token ids, truncated to a length budget.

Prompt and response are tokenized separately and their ids concatenated, so the boundary
between them (where the loss mask starts) is exact rather than recovered from offsets.
Layout of every sequence: [BOS] prompt | response [EOS]
- BOS is added only when the tokenizer defines one and adds it itself, and not twice when a
  chat template already wrote it into the prompt text.
- EOS ends every response (add_eos), so the model learns to stop; not twice either.
Truncation: the prompt (BOS included) is cut to `max_prompt_length` first, `keep_end` keeping
its last tokens (the question nearest the answer survives; BOS stays) or `keep_start` its first;
then each response is cut to what `max_length` leaves, keeping its start. A prompt that leaves
no room for a single response token is a DataError. `TruncationSettings` holds the three
settings; every data config (preference, KTO, SFT, reward model, ARM) is one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prefalign.config import ConfigError, bounded
from prefalign.data.records import (
    DataError,
    PreferenceRecord,
    PromptCompletionRecord,
    UnpairedRecord,
)

Truncation = Literal["keep_end", "keep_start"]


@dataclass
class TruncationSettings:
    """The length budget of tokenized examples. Data configs extend it, so their keys read
    `data.max_length`, `data.max_prompt_length`, `data.truncation`; null means no limit."""

    max_length: int | None = bounded(512, min=2)  # prompt + response tokens
    max_prompt_length: int | None = bounded(256, min=1)  # the prompt is cut to this first
    truncation: Truncation = "keep_end"  # which end of a long prompt survives

    def limits(self) -> dict[str, Any]:
        """The keyword arguments of `tokenize_preference` / `_unpaired` / `_sft`."""
        return {
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncation": self.truncation,
        }

    def bounds_problem(self) -> tuple[str, str] | None:
        """(setting, what is wrong) or None; configs check the same bounds on load. A prompt
        budget that fills max_length is allowed: a prompt too long for it is a located row
        error, and lowering max_length alone must not need max_prompt_length too."""
        if self.truncation not in ("keep_end", "keep_start"):
            return "truncation", f"must be 'keep_end' or 'keep_start', got {self.truncation!r}"
        if self.max_length is not None and self.max_length < 2:
            return "max_length", f"must be at least 2, got {self.max_length}"
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            return "max_prompt_length", f"must be at least 1, got {self.max_prompt_length}"
        return None


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False  # anything was cut to fit the length budget

    @property
    def length(self) -> int:
        """Tokens of the longer of its two rows."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id if this tokenizer puts one in front of its inputs (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


class _Budget:
    """Tokenizes prompts and responses and cuts them to the length budget."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None,
        max_prompt_length: int | None,
        truncation: str,
        add_eos: bool,
    ) -> None:
        problem = TruncationSettings(max_length, max_prompt_length, truncation).bounds_problem()
        if problem is not None:
            raise ConfigError(f"{problem[0]} {problem[1]}")
        if add_eos and tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; set one or pass add_eos=False")
        self.tokenizer, self.truncation = tokenizer, truncation
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.bos = bos_to_add(tokenizer)
        self.eos = tokenizer.eos_token_id if add_eos else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        # One batched call: fast tokenizers do the whole list in Rust.
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []

    def prompts(self, texts: list[str]) -> list[list[int]]:
        rows = self.encode(texts)
        if self.bos is None:
            return rows
        return [ids if ids[:1] == [self.bos] else [self.bos, *ids] for ids in rows]

    def responses(self, texts: list[str]) -> list[list[int]]:
        rows = self.encode(texts)
        if self.eos is None:
            return rows
        return [ids if ids[-1:] == [self.eos] else [*ids, self.eos] for ids in rows]

    def cut_prompt(self, ids: list[int], record: Any) -> tuple[list[int], bool]:
        limit = self.max_prompt_length
        cut = limit is not None and len(ids) > limit
        if cut:
            if self.truncation == "keep_start":
                ids = ids[:limit]
            else:
                head = ids[:1] if self.bos is not None and ids[:1] == [self.bos] else []
                keep = limit - len(head)
                ids = head + (ids[len(ids) - keep :] if keep > 0 else [])
        if self.max_length is not None and len(ids) >= self.max_length:
            raise DataError(
                record.source,
                record.line,
                f"{len(ids)} prompt tokens leave no room for the response "
                f"within max_length={self.max_length} "
                f"(max_prompt_length={limit}); lower max_prompt_length or raise max_length",
                field="prompt",
                reason="no_room_for_response",
            )
        return ids, cut

    def cut_response(
        self, prompt: list[int], ids: list[int], record: Any, field: str
    ) -> tuple[list[int], bool]:
        if not ids:
            raise DataError(
                record.source,
                record.line,
                "tokenizes to no tokens",
                field=field,
                reason="empty_response",
            )
        if self.max_length is None:
            return ids, False
        room = self.max_length - len(prompt)
        return ids[:room], len(ids) > room


def _check_rows(
    records: Sequence[Any],
    rows: list[tuple[Any, ...]],
    skip_invalid: bool,
    build: Callable[..., Any],
) -> tuple[list, Counter[str]]:
    """Build each tokenized row; a DataError raises, or is counted with skip_invalid."""
    out: list = []
    skipped: Counter[str] = Counter()
    for record, row in zip(records, rows, strict=True):
        try:
            out.append(build(record, *row))
        except DataError as exc:
            if not skip_invalid:
                raise
            skipped[exc.reason] += 1
    return out, skipped


def tokenize_preference(
    records: Sequence[PreferenceRecord],
    tokenizer: Any,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation: Truncation = "keep_end",
    add_eos: bool = True,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedPair], Counter[str]]:
    """Tokenize pairs; returns them and the skipped count by reason (empty unless skip_invalid)."""
    budget = _Budget(tokenizer, max_length, max_prompt_length, truncation, add_eos)
    rows = list(
        zip(
            budget.prompts([r.prompt for r in records]),
            budget.responses([r.chosen for r in records]),
            budget.responses([r.rejected for r in records]),
            strict=True,
        )
    )

    def build(
        record: PreferenceRecord, prompt: list[int], chosen: list[int], rejected: list[int]
    ) -> TokenizedPair:
        prompt, cut_p = budget.cut_prompt(prompt, record)
        chosen, cut_c = budget.cut_response(prompt, chosen, record, "chosen")
        rejected, cut_r = budget.cut_response(prompt, rejected, record, "rejected")
        if chosen == rejected:  # the loss would see no difference between the two
            if cut_c or cut_r:  # they differed only past the budget
                message = (
                    f"identical to 'chosen' once cut to max_length={budget.max_length} "
                    f"({len(prompt)} prompt + {len(chosen)} response tokens); raise max_length"
                )
                reason = "identical_after_truncation"
            else:  # different texts, same ids: a normalizing or unknown-token tokenizer
                message = (
                    f"tokenizes to the same {len(chosen)} ids as 'chosen' (no truncation): "
                    "the pair carries no preference"
                )
                reason = "identical_token_ids"
            raise DataError(record.source, record.line, message, field="rejected", reason=reason)
        return TokenizedPair(prompt, chosen, rejected, truncated=cut_p or cut_c or cut_r)

    return _check_rows(records, rows, skip_invalid, build)


def tokenize_unpaired(
    records: Sequence[UnpairedRecord],
    tokenizer: Any,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation: Truncation = "keep_end",
    add_eos: bool = True,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedUnpaired], Counter[str]]:
    """Tokenize KTO rows; same layout and truncation as `tokenize_preference`."""
    budget = _Budget(tokenizer, max_length, max_prompt_length, truncation, add_eos)
    return _tokenize_completions(
        records,
        budget,
        skip_invalid,
        lambda r, p, c, cut: TokenizedUnpaired(p, c, r.label, truncated=cut),
    )


def tokenize_sft(
    records: Sequence[PromptCompletionRecord],
    tokenizer: Any,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation: Truncation = "keep_end",
    add_eos: bool = True,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedExample], Counter[str]]:
    """Tokenize prompt/completion rows; same layout and truncation as `tokenize_preference`."""
    budget = _Budget(tokenizer, max_length, max_prompt_length, truncation, add_eos)
    return _tokenize_completions(
        records, budget, skip_invalid, lambda r, p, c, cut: TokenizedExample(p, c, truncated=cut)
    )


def _tokenize_completions(
    records: Sequence[Any], budget: _Budget, skip_invalid: bool, make: Callable
) -> tuple[list, Counter[str]]:
    """Rows with one `completion` each (KTO, SFT): encode, truncate, then
    `make(record, prompt, completion, truncated)`."""
    rows = list(
        zip(
            budget.prompts([r.prompt for r in records]),
            budget.responses([r.completion for r in records]),
            strict=True,
        )
    )

    def build(record: Any, prompt: list[int], completion: list[int]):
        prompt, cut_p = budget.cut_prompt(prompt, record)
        completion, cut_c = budget.cut_response(prompt, completion, record, "completion")
        return make(record, prompt, completion, cut_p or cut_c)

    return _check_rows(records, rows, skip_invalid, build)
