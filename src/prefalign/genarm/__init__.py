"""GenARM: autoregressive reward models for test-time alignment
(Xu et al., 2025, "GenARM: Reward Guided Generation with Autoregressive Reward Model").

- `arm`: train an ARM with the preference trainer (objective genarm, no reference) and measure
  held-out pair accuracy of its implied reward `beta_r * log pi_arm(y|x)`.
- `decoding`: guided decoding `log pi_base + sum_i alpha_i log pi_arm_i` (any number of ARMs,
  batched, one KV cache per model), and the guided distribution for teacher-forced scoring.
- `baselines`: ARGS and best-of-N with a sequence reward model (`prefalign.reward_models`).
"""

from prefalign.genarm.decoding import (
    Arm,
    GuidedDecoder,
    GuidedPolicy,
    SampledLogps,
    TextStream,
    check_tokenizers,
    guided_generate,
    load_arm,
)

__all__ = [
    "Arm",
    "GuidedDecoder",
    "GuidedPolicy",
    "SampledLogps",
    "TextStream",
    "check_tokenizers",
    "guided_generate",
    "load_arm",
]
