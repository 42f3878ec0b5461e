"""prefalign.modeling: round trips through save_pretrained for several architectures, dtypes,
pad tokens, chat templates, LoRA (fresh and saved adapters) and gradient checkpointing."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    BOS,
    EOS,
    PAD,
    VOCAB,
    VOCAB_SIZE,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_qwen2_config,
)
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
)

from prefalign.modeling import (
    LoraSpec,
    apply_chat_template,
    count_parameters,
    is_peft_model,
    load_model,
    load_tokenizer,
    resolve_dtype,
)

# peft itself still reads the deprecated `is_gradient_checkpointing` of transformers 5
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

SPECIAL_IDS = dict(
    bos_token_id=VOCAB.index(BOS), eos_token_id=VOCAB.index(EOS), pad_token_id=VOCAB.index(PAD)
)


def tiny_llama() -> PreTrainedModel:
    return LlamaForCausalLM(tiny_llama_config())


def tiny_qwen2() -> PreTrainedModel:
    config = tiny_qwen2_config(**SPECIAL_IDS)
    return Qwen2ForCausalLM(config)


def tiny_gpt2() -> PreTrainedModel:
    config = tiny_gpt2_config(**SPECIAL_IDS)
    return GPT2LMHeadModel(config)  # lm_head tied to wte


def tiny_gemma() -> PreTrainedModel:
    config = GemmaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        **SPECIAL_IDS,
    )
    return GemmaForCausalLM(config)  # scaled, tied embeddings


ARCHITECTURES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "gpt2": tiny_gpt2,
    "gemma": tiny_gemma,
}
TEXTS = ["hello how is the movie ?", "the book was very very good and the film was bad ."]


def save(model: PreTrainedModel, tokenizer, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def batch(tiny_tokenizer) -> dict[str, torch.Tensor]:
    return tiny_tokenizer(TEXTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_round_trip_reproduces_logits(arch, tmp_path, tiny_tokenizer, batch):
    torch.manual_seed(0)
    original = ARCHITECTURES[arch]().eval()
    path = save(original, tiny_tokenizer, tmp_path / arch)

    model = load_model(path, device="cpu").eval()
    tokenizer = load_tokenizer(path)

    assert type(model) is type(original)
    assert not is_peft_model(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the saved tokenizer itself, not one rebuilt for the architecture (transformers 5's
    # AutoTokenizer builds a Qwen2Tokenizer from the vocabulary for any qwen2 directory)
    assert type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert tokenizer(TEXTS[1]).input_ids == tiny_tokenizer(TEXTS[1]).input_ids
    assert tokenizer.pad_token == PAD and tokenizer.eos_token == EOS
    expected = logits(original, batch)
    assert expected.shape == (2, batch["input_ids"].shape[1], VOCAB_SIZE)
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=1e-6)

    torch.manual_seed(1)  # a differently initialised model must not pass the same check
    other = ARCHITECTURES[arch]().eval()
    assert not torch.allclose(logits(other, batch), expected, atol=1e-3)


def test_bfloat16_loads_bfloat16_parameters(tiny_llama_dir, batch):
    full = load_model(tiny_llama_dir, device="cpu").eval()
    half = load_model(tiny_llama_dir, dtype="bfloat16", device="cpu").eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    out = logits(half, batch)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), logits(full, batch), rtol=0.05, atol=0.05)
    # a torch.dtype is accepted as well as its name
    assert {
        p.dtype for p in load_model(tiny_llama_dir, dtype=torch.bfloat16, device="cpu").parameters()
    } == {torch.bfloat16}


def test_unknown_dtype_names_the_allowed_ones(tiny_llama_dir):
    with pytest.raises(
        ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'fp8'"
    ):
        load_model(tiny_llama_dir, dtype="fp8", device="cpu")
    assert resolve_dtype("float16") is torch.float16


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, make_tiny_tokenizer, tiny_llama_dir):
    make_tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    raw = make_tiny_tokenizer(pad=False)
    assert raw.pad_token is None

    tokenizer = load_tokenizer(tmp_path)
    eos_id = VOCAB.index(EOS)
    assert tokenizer.pad_token == EOS and tokenizer.pad_token_id == eos_id
    assert tokenizer.padding_side == "right"
    short, long = "hello", "the movie was good"
    enc = tokenizer([short, long], padding=True, return_tensors="pt")
    assert enc.input_ids.tolist()[0] == [VOCAB.index("hello"), eos_id, eos_id, eos_id]
    assert enc.attention_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]

    left = load_tokenizer(tmp_path, padding_side="left")
    enc_left = left([short, long], padding=True, return_tensors="pt")
    assert enc_left.input_ids.tolist()[0] == [eos_id, eos_id, eos_id, VOCAB.index("hello")]
    assert enc_left.attention_mask.tolist()[0] == [0, 0, 0, 1]

    # right padding leaves the real tokens' logits as they are without padding
    model = load_model(tiny_llama_dir, device="cpu").eval()
    alone = tokenizer([short], return_tensors="pt")
    torch.testing.assert_close(
        logits(model, enc)[0, :1], logits(model, alone)[0], rtol=0, atol=1e-5
    )


def test_tokenizer_keeps_its_own_pad_token(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    assert (
        tokenizer.pad_token == PAD
        and tokenizer.pad_token_id == VOCAB.index(PAD) != tokenizer.eos_token_id
    )


def test_tokenizer_without_pad_or_eos_is_an_error(tmp_path, make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(pad=False)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        load_tokenizer(tmp_path)


def test_chat_template_renders(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    messages = [
        {"role": "user", "content": "how is it ?"},
        {"role": "assistant", "content": "good"},
    ]
    assert apply_chat_template(tokenizer, messages, add_generation_prompt=False) == (
        "<|user|> how is it ? <|assistant|> good "
    )
    assert apply_chat_template(tokenizer, messages[:1], add_generation_prompt=True) == (
        "<|user|> how is it ? <|assistant|> "
    )


def test_chat_template_missing_is_a_clear_error(tmp_path, make_tiny_tokenizer):
    make_tiny_tokenizer(chat_template=None).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(
        ValueError, match="needs a tokenizer with a chat template; this tokenizer has none"
    ):
        apply_chat_template(
            tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True
        )


LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_trains_only_adapters_and_starts_at_the_base(tiny_llama_dir, batch):
    base = load_model(tiny_llama_dir, device="cpu").eval()
    torch.manual_seed(0)
    model = load_model(tiny_llama_dir, device="cpu", lora=LoraSpec(r=4, alpha=8)).eval()
    assert is_peft_model(model)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # "all-linear": every projection of every layer, never the output head
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == LLAMA_LINEARS
    assert len(trainable) == 2 * len(LLAMA_LINEARS) * 2  # A and B, per linear, per layer
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    lora_a = next(p for n, p in model.named_parameters() if "q_proj.lora_A" in n)
    assert lora_a.shape[0] == 4
    assert count_parameters(model, trainable_only=True) == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n
    )
    assert count_parameters(model) == count_parameters(base) + count_parameters(
        model, trainable_only=True
    )

    # B starts at zero, so the adapted model computes exactly the base model
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=1e-6)


def perturb_lora_b(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def test_saved_adapter_loads_back_with_equal_outputs(
    tiny_llama_dir, tiny_tokenizer, tmp_path, batch
):
    base = load_model(tiny_llama_dir, device="cpu").eval()
    model = load_model(tiny_llama_dir, device="cpu", lora=LoraSpec(r=4, alpha=8)).eval()
    perturb_lora_b(model)  # a trained adapter, as far as the round trip can tell
    expected = logits(model, batch)
    assert not torch.allclose(expected, logits(base, batch), atol=1e-3)

    adapter_dir = tmp_path / "adapter"
    save(model, tiny_tokenizer, adapter_dir)  # as the trainer saves a LoRA run: adapter + tokenizer
    assert (adapter_dir / "adapter_config.json").exists()
    assert not (adapter_dir / "config.json").exists()
    assert load_tokenizer(adapter_dir)(TEXTS[0]).input_ids == tiny_tokenizer(TEXTS[0]).input_ids

    loaded = load_model(adapter_dir, device="cpu").eval()
    assert is_peft_model(loaded)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=1e-6)
    # loaded to keep training: the adapter, and only the adapter, is trainable
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # asking for LoRA again does not stack a second adapter on the loaded one
    again = load_model(adapter_dir, device="cpu", lora=LoraSpec(r=2)).eval()
    assert list(again.peft_config) == ["default"] and again.peft_config["default"].r == 4
    torch.testing.assert_close(logits(again, batch), expected, rtol=0, atol=1e-6)


def test_saved_adapter_loads_in_bfloat16(tiny_llama_dir, tmp_path, batch):
    model = load_model(tiny_llama_dir, device="cpu", lora=LoraSpec(r=4, alpha=8)).eval()
    perturb_lora_b(model)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="bfloat16", device="cpu").eval()
    base_dtypes = {p.dtype for n, p in loaded.named_parameters() if "lora_" not in n}
    assert base_dtypes == {torch.bfloat16}
    torch.testing.assert_close(
        logits(loaded, batch).float(), logits(model, batch), rtol=0.05, atol=0.05
    )


def loss_and_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict]:
    model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def count_mlp_calls(model: torch.nn.Module) -> list[int]:
    """Count calls of the first layer's MLP: checkpointing reruns the layer during backward.

    A pre-hook, since torch's non-reentrant checkpoint may stop a recompute early, before the
    forward hooks of its last modules.
    """
    calls = [0]
    mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
    mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8)], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir, batch, lora):
    torch.manual_seed(0)  # the same LoRA A init in both
    plain = load_model(tiny_llama_dir, device="cpu", lora=lora)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointed = load_model(
            tiny_llama_dir, device="cpu", lora=lora, gradient_checkpointing=True
        )
    assert not [
        w for w in caught if "gradient_checkpointing_enable" in str(w.message)
    ]  # no deprecated API
    if lora is not None:  # B != 0 so that every gradient is non-trivial
        perturb_lora_b(plain)
        perturb_lora_b(checkpointed)
    assert checkpointing_on(checkpointed) and not checkpointing_on(plain)
    assert checkpointed.config.use_cache is False

    plain_calls, checkpointed_calls = count_mlp_calls(plain), count_mlp_calls(checkpointed)
    loss, grads = loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, batch)
    assert plain_calls[0] == 1 and checkpointed_calls[0] == 2  # recomputed in backward

    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    assert all(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_wrapping_prints_no_deprecation_warning(tiny_llama_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(tiny_llama_dir, device="cpu", lora=LoraSpec(r=4, alpha=8))
    deprecations = [
        w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    assert not deprecations, [str(w.message) for w in deprecations]
