"""Load, validate, tokenize and batch preference, unpaired (KTO) and prompt/completion (SFT) data.

result = load_preference_data("pairs.jsonl", tokenizer=tok)        # records + skipped
pairs, _ = tokenize_preference(result.records, tok, max_length=512, max_prompt_length=256)
batches = length_grouped_batches([p.length for p in pairs], batch_size=8, seed=0)
batch = collate_pairs([pairs[i] for i in batches[0]], pad_id=tok.pad_token_id)
"""

from prefalign.data.collate import (
    collate_pairs,
    collate_sft,
    collate_unpaired,
    length_grouped_batches,
)
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
    "UnpairedRecord",
    "collate_pairs",
    "collate_sft",
    "collate_unpaired",
    "length_grouped_batches",
    "load_preference_data",
    "load_sft_data",
    "load_unpaired_data",
    "split_common_prefix",
    "tokenize_preference",
    "tokenize_sft",
    "tokenize_unpaired",
]
