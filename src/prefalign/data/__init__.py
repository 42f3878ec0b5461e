"""Load, validate, tokenize and batch preference, unpaired (KTO) and prompt/completion (SFT) data.

result = load_preference_data("pairs.jsonl", tokenizer=tok)        # records + skipped
pairs, _ = tokenize_preference(result.records, tok, max_length=512, max_prompt_length=256)
batch = collate_pairs(pairs[:8], pad_id=tok.pad_token_id)

Training plans its batches itself (`prefalign.training.loop.batch_plan`, length-grouped); a
`Trainer.fit(lengths, collate, loss_fn)` caller gives it the lengths and a collate function.
"""

from prefalign.data.collate import collate_pairs, collate_unpaired
from prefalign.data.loading import load_preference_data, load_sft_data, load_unpaired_data
from prefalign.data.records import (
    DataError,
    LoadResult,
    PreferenceRecord,
    PromptCompletionRecord,
    UnpairedRecord,
)
from prefalign.data.tokenize import (
    TokenizedExample,
    TokenizedPair,
    TokenizedUnpaired,
    TruncationSettings,
    tokenize_preference,
    tokenize_sft,
    tokenize_unpaired,
)
from prefalign.data.validation import split_common_prefix

__all__ = [
    "DataError",
    "LoadResult",
    "PreferenceRecord",
    "PromptCompletionRecord",
    "TokenizedExample",
    "TokenizedPair",
    "TokenizedUnpaired",
    "TruncationSettings",
    "UnpairedRecord",
    "collate_pairs",
    "collate_unpaired",
    "load_preference_data",
    "load_sft_data",
    "load_unpaired_data",
    "split_common_prefix",
    "tokenize_preference",
    "tokenize_sft",
    "tokenize_unpaired",
]
