"""The decoding loop: the transformers cache API (no deprecation warning) and one device-to-host
copy per decoding step, whatever the batch size."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from transformers import LlamaForCausalLM

from prefalign.generation import SamplingParams, generate, generate_batch

HOST_COPIES = {"tolist", "item", "__bool__", "__int__", "__index__", "__float__"}
GENERATION = str(Path(sys.modules["prefalign.generation"].__file__).resolve())


class HostCopies(TorchFunctionMode):
    """Counts the tensor-to-Python conversions made by the code of prefalign/generation.py."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_COPIES:
            caller = sys._getframe(1).f_code.co_filename
            self.count += str(Path(caller).resolve()) == GENERATION
        return func(*args, **(kwargs or {}))


def test_one_host_copy_per_decoding_step(tiny_llama_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompts = [[4, 5, 6], [7, 8], [9], [10, 11, 12, 13]] * 4  # 16 rows
    params = SamplingParams(max_new_tokens=6, stop_at_eos=False)
    with HostCopies() as copies:
        out = generate_batch(
            model,
            prompts,
            eos_id=3,
            pad_id=0,
            params=params,
            generator=torch.Generator().manual_seed(0),
        )
    assert [len(r) for r in out] == [6] * 16
    assert copies.count == 6  # was 2 + 16 per step: one int() per row, nonzero(), done.all()


def test_rows_stop_at_eos_and_finished_rows_get_no_more_tokens(tiny_llama_dir, tiny_tokenizer):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    eos = tiny_tokenizer.eos_token_id
    params = SamplingParams(max_new_tokens=12, seed=3)
    gens = generate(model, tiny_tokenizer, ["the movie was", "one plus two"] * 8, params)
    for g in gens:
        assert eos not in g.response_ids[:-1]  # nothing after EOS
        assert len(g.response_ids) == 12 or g.response_ids[-1] == eos


def test_decoding_prints_no_deprecation_warning(tiny_llama_dir, tiny_tokenizer, caplog):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        generate(model, tiny_tokenizer, ["the movie was"], SamplingParams(max_new_tokens=4))
    deprecations = [
        w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    assert not deprecations, [str(w.message) for w in deprecations]
    assert "deprecated" not in caplog.text
