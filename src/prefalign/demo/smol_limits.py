"""Sequence limits shared by every SmolLM2 demo row (preference, GenARM, ReST).

The world keeps only replies that stopped on EOS within 64 new tokens, so 128 tokens of prompt
and reply hold every pair whole: no training response loses its end.
"""

DATA_LIMITS = ["data.max_length=128", "data.max_prompt_length=64"]
