"""Turn one raw row (a dict from any file format) into a validated record, or raise a DataError.

Formats recognised per row, the ones users already have:
- standard: `prompt`/`chosen`/`rejected` strings;
- conversational: `prompt` a list of `{role, content}` messages and `chosen`/`rejected` lists of
  assistant messages, rendered with the tokenizer's chat template (the prompt with the generation
  prompt, each response as the rest of the full conversation's text);
- implicit prompt: only `chosen`/`rejected`; the prompt is their longest common prefix
  (see `split_common_prefix`: text level, cut back to a word boundary);
- unpaired (KTO): `prompt`/`completion`/`label` with a boolean label;
- SFT: `prompt`/`completion`, or a conversational `messages` list ending in an assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefalign.data.records import (
    DataError,
    PreferenceRecord,
    PromptCompletionRecord,
    UnpairedRecord,
)

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")
SFT_FIELDS = ("prompt", "completion", "messages")

# Column sets a tabular file may have, per kind (any one of them is enough).
PREFERENCE_COLUMNS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
UNPAIRED_COLUMNS = (("prompt", "completion", "label"),)
SFT_COLUMNS = (("prompt", "completion"), ("messages",))

# Roles chat templates know; anything else is a typo or another dataset's dialect, which a
# template would render wrongly or drop without a word.
ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}

# CSV cells are untyped, so a label there is spelled out; typed formats must hold a real bool.
CSV_TRUE = {"true", "1"}
CSV_FALSE = {"false", "0"}


@dataclass(frozen=True)
class Row:
    """Where a row comes from and what it may be rendered with."""

    source: str
    line: int
    tokenizer: Any = None
    typed: bool = True  # False for CSV, whose every cell is a string

    def error(self, what: str, *, field: str | None = None, reason: str) -> DataError:
        return DataError(self.source, self.line, what, field=field, reason=reason)


def type_name(value: Any) -> str:
    return {dict: "object", list: "list", type(None): "null"}.get(type(value), type(value).__name__)


def check_columns(
    source: str, columns: list[str], alternatives: tuple[tuple[str, ...], ...]
) -> None:
    """File-level check for tabular formats: one clear error instead of one per row."""
    present = set(columns)
    best = max(alternatives, key=lambda alt: len(present & set(alt)))
    if set(best) <= present:
        return
    have = ", ".join(columns) or "none"
    if not present & {f for alt in alternatives for f in alt}:
        expected = " or ".join("/".join(alt) for alt in alternatives)
        raise DataError(
            source,
            None,
            f"no recognised columns (columns: {have}); expected {expected}",
            reason="unknown_format",
            row_level=False,
        )
    missing = [f for f in best if f not in present]
    raise DataError(
        source,
        None,
        f"missing column (columns: {have})",
        field=missing[0],
        reason="missing_column",
        row_level=False,
    )


def as_object(value: Any, row: Row, known: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise row.error(f"expected a JSON object, got {type_name(value)}", reason="not_object")
    if not set(value) & set(known):
        got = ", ".join(map(str, value)) or "none"
        raise row.error(
            f"no recognised fields (got: {got}); expected some of {', '.join(known)}",
            reason="unknown_format",
        )
    return value


def require(obj: dict, name: str, row: Row) -> Any:
    if name not in obj:
        raise row.error("missing", field=name, reason="missing_field")
    if obj[name] is None:
        raise row.error("is null", field=name, reason="null_field")
    return obj[name]


def check_text(value: Any, name: str, row: Row, *, response: bool) -> str:
    if not isinstance(value, str):
        raise row.error(
            f"expected a string, got {type_name(value)}", field=name, reason="not_string"
        )
    if response and not value.strip():
        raise row.error("empty or whitespace-only response", field=name, reason="empty_response")
    return value


def check_messages(value: Any, name: str, row: Row, *, response: bool) -> list[dict]:
    if not isinstance(value, list):
        raise row.error(
            f"expected a list of {{role, content}} messages, got {type_name(value)}",
            field=name,
            reason="not_messages",
        )
    if not value:
        raise row.error(
            "empty list of messages",
            field=name,
            reason="empty_response" if response else "bad_message",
        )
    for i, message in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise row.error(
                f"expected a message object, got {type_name(message)}",
                field=at,
                reason="bad_message",
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if key not in message else type_name(message[key])
                raise row.error(
                    f"message needs a string '{key}', got {got}", field=at, reason="bad_message"
                )
        if message["role"] not in ROLES:
            hint = SHAREGPT_ROLES.get(message["role"])
            raise row.error(
                f"unknown role {message['role']!r}; allowed: {', '.join(ROLES)}"
                + (f" (ShareGPT's '{message['role']}' is '{hint}')" if hint else ""),
                field=at,
                reason="bad_role",
            )
    if response and not any(m["content"].strip() for m in value):
        raise row.error("empty or whitespace-only response", field=name, reason="empty_response")
    return value


class Renderer:
    """Renders conversational rows with a chat template; the prompt text is shared by its
    responses."""

    def __init__(self, prompt: list[dict], row: Row) -> None:
        tokenizer = row.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise row.error(
                "conversational data needs a tokenizer with a chat template "
                "(pass tokenizer=..., or give prompt/response strings)",
                field="prompt",
                reason="no_chat_template",
            )
        self.messages, self.row = prompt, row
        self.prompt = self._apply(prompt, True, "prompt")

    def _apply(self, messages: list[dict], add_generation_prompt: bool, field: str) -> str:
        # Imported here: prefalign.modeling pulls in the model classes, seconds of import time
        # that string-only data never needs.
        from prefalign.modeling import apply_chat_template

        try:
            return apply_chat_template(self.row.tokenizer, messages, add_generation_prompt)
        except Exception as exc:  # jinja raise_exception() or a template bug: name the row
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise self.row.error(
                f"chat template failed: {first}", field=field, reason="chat_template_error"
            ) from exc

    def response(self, messages: list[dict], field: str) -> str:
        full = self._apply(self.messages + messages, False, field)
        # The response is whatever the template adds after the prompt; that needs the prompt
        # to render as a prefix of the whole conversation.
        if not full.startswith(self.prompt):
            raise self.row.error(
                "the chat template does not render the prompt as a prefix of the full conversation",
                field=field,
                reason="template_not_prefix",
            )
        text = full[len(self.prompt) :]
        if not text.strip():
            raise self.row.error(
                "empty or whitespace-only response", field=field, reason="empty_response"
            )
        return text


def split_common_prefix(a: str, b: str) -> tuple[str, str, str]:
    """Split two full texts into (shared prompt, rest of a, rest of b), at TEXT level.

    The longest common character prefix is cut back so it never ends inside a word (`"... is
    good"` vs `"... is great"` must not give the prompt `"... is g"`), and whitespace before the
    first differing word goes to the responses, as byte-level BPE tokenizers attach a space to
    the word after it. Text level keeps loading independent of the tokenizer.
    """
    k = 0
    for ca, cb in zip(a, b, strict=False):
        if ca != cb:
            break
        k += 1

    def splits_word(i: int) -> bool:
        after = (i < len(a) and a[i].isalnum()) or (i < len(b) and b[i].isalnum())
        return a[i - 1].isalnum() and after

    while k > 0 and splits_word(k):
        k -= 1
    while k > 0 and a[k - 1].isspace():
        k -= 1
    return a[:k], a[k:], b[k:]


def preference_record(value: Any, row: Row) -> PreferenceRecord:
    obj = as_object(value, row, PREFERENCE_FIELDS)
    chosen = require(obj, "chosen", row)
    rejected = require(obj, "rejected", row)
    if "prompt" not in obj:
        prompt, chosen, rejected = implicit_prompt(chosen, rejected, row)
    else:
        prompt = require(obj, "prompt", row)
        prompt, (chosen, rejected) = render_responses(
            prompt, {"chosen": chosen, "rejected": rejected}, row
        )
    if chosen == rejected:
        raise row.error("identical to 'chosen'", field="rejected", reason="identical_responses")
    return PreferenceRecord(prompt, chosen, rejected, row.source, row.line)


def render_responses(prompt: Any, responses: dict[str, Any], row: Row) -> tuple[str, list[str]]:
    """Check a prompt and its responses, both strings or both conversational, and return texts."""
    if isinstance(prompt, str):
        for name, value in responses.items():
            if isinstance(value, list):
                raise row.error(
                    "is a list of messages but 'prompt' is a string",
                    field=name,
                    reason="mixed_formats",
                )
        return prompt, [check_text(v, k, row, response=True) for k, v in responses.items()]
    if not isinstance(prompt, list):
        raise row.error(
            f"expected a string or a list of messages, got {type_name(prompt)}",
            field="prompt",
            reason="not_string",
        )
    check_messages(prompt, "prompt", row, response=False)
    for name, value in responses.items():
        if isinstance(value, str):
            raise row.error(
                "is a string but 'prompt' is a list of messages", field=name, reason="mixed_formats"
            )
        check_messages(value, name, row, response=True)
    renderer = Renderer(prompt, row)
    return renderer.prompt, [renderer.response(v, k) for k, v in responses.items()]


def implicit_prompt(chosen: Any, rejected: Any, row: Row) -> tuple[str, str, str]:
    """Implicit-prompt rows: the prompt is what `chosen` and `rejected` share at the start."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        check_messages(chosen, "chosen", row, response=True)
        check_messages(rejected, "rejected", row, response=True)
        if chosen == rejected:
            raise row.error("identical to 'chosen'", field="rejected", reason="identical_responses")
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            raise row.error(
                "no common prompt: 'chosen' and 'rejected' differ from the first message",
                field="chosen",
                reason="no_common_prefix",
            )
        for name, rest in (("chosen", chosen[k:]), ("rejected", rejected[k:])):
            if not rest:
                raise row.error(
                    "no response after the common prompt messages",
                    field=name,
                    reason="empty_response",
                )
        renderer = Renderer(chosen[:k], row)
        return (
            renderer.prompt,
            renderer.response(chosen[k:], "chosen"),
            renderer.response(rejected[k:], "rejected"),
        )
    chosen = check_text(chosen, "chosen", row, response=True)
    rejected = check_text(rejected, "rejected", row, response=True)
    if chosen == rejected:
        raise row.error("identical to 'chosen'", field="rejected", reason="identical_responses")
    prompt, chosen_rest, rejected_rest = split_common_prefix(chosen, rejected)
    if not prompt.strip():
        raise row.error(
            "no common prompt: without a 'prompt' field, 'chosen' and 'rejected' must start "
            "with the same prompt text",
            field="chosen",
            reason="no_common_prefix",
        )
    for name, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
        if not rest.strip():
            raise row.error(
                "no response after the common prompt text", field=name, reason="empty_response"
            )
    return prompt, chosen_rest, rejected_rest


def unpaired_record(value: Any, row: Row) -> UnpairedRecord:
    obj = as_object(value, row, UNPAIRED_FIELDS)
    prompt = require(obj, "prompt", row)
    completion = require(obj, "completion", row)
    label = check_label(require(obj, "label", row), row)
    prompt, (completion,) = render_responses(prompt, {"completion": completion}, row)
    return UnpairedRecord(prompt, completion, label, row.source, row.line)


def check_label(value: Any, row: Row) -> bool:
    if isinstance(value, bool):
        return value
    if not row.typed and isinstance(value, str):
        spelled = value.strip().lower()
        if spelled in CSV_TRUE | CSV_FALSE:
            return spelled in CSV_TRUE
    raise row.error(
        "expected a boolean (true = desirable, false = undesirable), "
        f"got {type_name(value)} {value!r}",
        field="label",
        reason="bad_label",
    )


def sft_record(value: Any, row: Row) -> PromptCompletionRecord:
    obj = as_object(value, row, SFT_FIELDS)
    if "messages" in obj and "completion" not in obj:
        messages = check_messages(require(obj, "messages", row), "messages", row, response=False)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise row.error(
                "needs at least one prompt message followed by a final assistant message",
                field="messages",
                reason="bad_message",
            )
        if not messages[-1]["content"].strip():
            raise row.error(
                "empty or whitespace-only response", field="messages", reason="empty_response"
            )
        renderer = Renderer(messages[:-1], row)
        return PromptCompletionRecord(
            renderer.prompt, renderer.response(messages[-1:], "messages"), row.source, row.line
        )
    prompt = require(obj, "prompt", row)
    completion = require(obj, "completion", row)
    prompt, (completion,) = render_responses(prompt, {"completion": completion}, row)
    return PromptCompletionRecord(prompt, completion, row.source, row.line)
