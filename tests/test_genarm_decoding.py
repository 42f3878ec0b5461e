"""GenARM guided decoding on tiny random Llamas: identities that pin the score arithmetic,
the KV caches, left padding, streaming and the tokenizer check."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, VOCAB_SIZE, build_tiny_tokenizer, tiny_gpt2, tiny_llama_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from prefalign.evaluation.core import response_logps
from prefalign.genarm import (
    Arm,
    GuidedDecoder,
    GuidedPolicy,
    SampledLogps,
    TextStream,
    guided_generate,
    load_arm,
)
from prefalign.generation import SamplingParams, generate

PROMPTS = [
    "the movie was",
    "i",
    "what is the answer ?",
    "hello",
    "two plus two equals",
    "the film was very good and",
]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, batch_size=8)


def tiny_model(seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def base():
    return tiny_model(0)


@pytest.fixture(scope="module")
def arm():
    # A smaller ARM (one layer, narrower) than the base: weak-to-strong shapes must work.
    return tiny_model(
        1,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def ids(generations) -> list[list[int]]:
    return [g.response_ids for g in generations]


class Recorder:
    """on_step hook keeping every step's scores per prompt."""

    def __init__(self):
        self.scores: dict[int, list[torch.Tensor]] = {}
        self.tokens: dict[int, list[int]] = {}

    def __call__(self, rows, tokens, scores):
        for r, t, s in zip(rows, tokens, scores, strict=True):
            self.scores.setdefault(r, []).append(s.clone())
            self.tokens.setdefault(r, []).append(t)

    def stacked(self, r: int) -> torch.Tensor:
        return torch.stack(self.scores[r])


def test_zero_alpha_reproduces_base_greedy(base, arm, tok):
    plain = generate(base, tok, PROMPTS, GREEDY)
    guided = guided_generate(base, [(arm, 0.0), (copy.deepcopy(arm), 0.0)], tok, PROMPTS, GREEDY)
    assert ids(guided) == ids(plain)
    # The guidance must actually change something when switched on, or the test above is empty.
    assert ids(guided_generate(base, [(arm, 4.0)], tok, PROMPTS, GREEDY)) != ids(plain)


def test_one_arm_equals_two_half_copies(base, arm, tok):
    one, two = Recorder(), Recorder()
    a = guided_generate(base, [(arm, 1.5)], tok, PROMPTS, GREEDY, on_step=one)
    b = guided_generate(
        base, [(arm, 0.75), (copy.deepcopy(arm), 0.75)], tok, PROMPTS, GREEDY, on_step=two
    )
    assert ids(a) == ids(b)
    for r in range(len(PROMPTS)):
        torch.testing.assert_close(one.stacked(r), two.stacked(r), rtol=1e-5, atol=1e-5)


def test_guided_scores_are_the_weighted_sum(base, arm, tok):
    """The first step's scores equal log pi_base + alpha * log pi_arm computed by hand."""
    rec = Recorder()
    guided_generate(base, [(arm, 0.7)], tok, PROMPTS[:1], GREEDY, on_step=rec)
    prompt = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        want = torch.log_softmax(base(prompt).logits[0, -1], -1) + 0.7 * torch.log_softmax(
            arm(prompt).logits[0, -1], -1
        )
    torch.testing.assert_close(rec.scores[0][0], want, rtol=1e-5, atol=1e-5)


def gpt2_base() -> torch.nn.Module:
    """Absolute position embeddings: unlike RoPE, a wrong position offset under left padding
    shows."""
    return tiny_gpt2(seed=5, eos_token_id=VOCAB.index("</s>")).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def any_base(request, base):
    return base if request.param == "llama" else gpt2_base()


def test_cached_and_uncached_agree(any_base, arm, tok):
    cached, uncached = Recorder(), Recorder()
    arms = [(arm, 1.0), (tiny_model(2), -0.5)]
    a = guided_generate(any_base, arms, tok, PROMPTS, GREEDY, use_cache=True, on_step=cached)
    b = guided_generate(any_base, arms, tok, PROMPTS, GREEDY, use_cache=False, on_step=uncached)
    assert ids(a) == ids(b)
    for r in range(len(PROMPTS)):
        torch.testing.assert_close(cached.stacked(r), uncached.stacked(r), rtol=1e-4, atol=1e-4)


def test_batched_and_one_at_a_time_agree(any_base, arm, tok):
    batched, one = Recorder(), Recorder()
    a = guided_generate(any_base, [(arm, 1.0)], tok, PROMPTS, GREEDY, on_step=batched)
    single = SamplingParams(max_new_tokens=12, temperature=0.0, batch_size=1)
    b = guided_generate(any_base, [(arm, 1.0)], tok, PROMPTS, single, on_step=one)
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) > 2  # the batch really is left-padded
    assert ids(a) == ids(b)
    for r in range(len(PROMPTS)):
        torch.testing.assert_close(batched.stacked(r), one.stacked(r), rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_streams_every_token(base, arm, tok):
    params = SamplingParams(
        max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=3, batch_size=4
    )
    rec = Recorder()
    a = guided_generate(base, [(arm, 1.0)], tok, PROMPTS, params, on_step=rec)
    b = guided_generate(base, [(arm, 1.0)], tok, PROMPTS, params)
    assert ids(a) == ids(b)
    assert [rec.tokens[r] for r in range(len(PROMPTS))] == ids(a)


def test_text_stream_adds_up_to_the_responses(base, arm, tok):
    pieces: dict[int, str] = {}
    stream = TextStream(tok, lambda row, text: pieces.__setitem__(row, pieces.get(row, "") + text))
    out = guided_generate(
        base,
        [(arm, 1.0)],
        tok,
        PROMPTS,
        SamplingParams(max_new_tokens=6, temperature=1.0, batch_size=4),
        on_step=stream,
    )
    assert [pieces.get(i, "") for i in range(len(PROMPTS))] == [g.text for g in out]


def test_rows_stop_at_eos_or_max_tokens(base, arm, tok):
    eos = tok.eos_token_id

    def push_eos(base_logps, arm_logps):  # the second prompt ends at once, the others never
        scores = base_logps.clone()
        scores[:, eos] = float("-inf")
        scores[1, eos] = 1e9
        return scores

    out = generate(base, tok, PROMPTS[:3], GREEDY, score_fn=push_eos, guides=[arm])
    assert out[1].response_ids == [eos]
    assert [len(g.response_ids) for g in (out[0], out[2])] == [GREEDY.max_new_tokens] * 2


def test_decode_time_logps_match_teacher_forced_guided_policy(base, arm, tok):
    """log p_guided(y) recorded while sampling equals the GuidedPolicy's teacher-forced value,
    so KL(guided || base) of guided samples is measured on the distribution they came from."""
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0, batch_size=8)
    recorder = SampledLogps(len(PROMPTS))
    gens = guided_generate(base, [(arm, 2.0)], tok, PROMPTS, params, on_step=recorder)
    forced = response_logps(GuidedPolicy(base, [(arm, 2.0)]), gens, tok.pad_token_id)
    torch.testing.assert_close(forced, torch.tensor(recorder.logps), rtol=1e-4, atol=1e-4)


def other_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB_SIZE - 4)]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def test_tokenizer_mismatch_is_a_clear_error(base, arm, tok, tmp_path):
    # Same vocabulary size, different strings: only the tokenizer comparison can catch it.
    with pytest.raises(ValueError, match="tokenizer mismatch") as err:
        GuidedDecoder(base, [Arm(arm, 1.0, other_tokenizer())], tok)
    assert "\n" not in str(err.value)
    # Loaded from disk, the error names both models.
    arm.save_pretrained(tmp_path / "arm")
    other_tokenizer().save_pretrained(tmp_path / "arm")
    base.save_pretrained(tmp_path / "base")
    named_base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="tokenizer mismatch") as err:
        guided_generate(named_base, [load_arm(tmp_path / "arm", 1.0)], tok, PROMPTS, GREEDY)
    assert str(tmp_path / "arm") in str(err.value) and str(tmp_path / "base") in str(err.value)
    # An ARM too small for the tokenizer is refused even without its tokenizer.
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        guided_generate(
            base, [(tiny_model(3, vocab_size=VOCAB_SIZE - 5), 1.0)], tok, PROMPTS, GREEDY
        )


def test_padded_output_layers_are_cut_to_the_tokenizer(base, tok):
    """A model whose output layer is padded past the tokenizer (as Qwen sizes are) still
    combines."""
    padded = tiny_model(4, vocab_size=VOCAB_SIZE + 7)
    out = guided_generate(base, [(padded, 1.0)], tok, PROMPTS, GREEDY)
    assert all(t < VOCAB_SIZE for g in out for t in g.response_ids)
