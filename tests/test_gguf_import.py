"""GGUF import: tiny random models written as GGUF files come back with the same logits."""

from __future__ import annotations

import pytest
import torch
from gguf_files import CHAT_TEMPLATE, byte_level_bpe, tiny, write_gguf

from prefalign.cli import main
from prefalign.errors import UserError
from prefalign.modeling import load_model, load_tokenizer
from prefalign.models import cached_import, import_gguf

TEXT = "what is two plus three? the movie was good"


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_imported_model_has_the_logits_and_tokens_of_its_source(tmp_path, bpe, kind):
    source = tiny(kind, bpe.get_vocab_size())
    gguf_file = write_gguf(source, bpe, tmp_path / f"tiny-{kind}.gguf")
    out = import_gguf(f"gguf:{gguf_file}", tmp_path / "imported")

    tokenizer = load_tokenizer(out)
    assert tokenizer.encode(TEXT, add_special_tokens=False) == bpe.encode(TEXT).ids
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    model = load_model(out, device="cpu")
    assert type(model) is type(source)
    assert getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([bpe.encode(TEXT).ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)


def test_imported_model_trains_and_saves(tmp_path, bpe):
    gguf_file = write_gguf(tiny("llama", bpe.get_vocab_size()), bpe, tmp_path / "m.gguf")
    model = load_model(f"gguf:{gguf_file}", device="cpu")
    ids = torch.tensor([bpe.encode(TEXT).ids])
    model(ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.save_pretrained(tmp_path / "saved")  # a quantized-marked model refuses this
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_gguf_sources_are_cached_by_file_hash(tmp_path, bpe, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    gguf_file = write_gguf(tiny("qwen2", bpe.get_vocab_size()), bpe, tmp_path / "q.gguf")
    first = cached_import(f"gguf:{gguf_file}")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(gguf_file.read_bytes())
    assert cached_import(str(copy)) == first  # same bytes, same entry
    assert load_tokenizer(str(copy)).name_or_path == str(first)
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [first.name]


def test_bf16_import(tmp_path, bpe):
    gguf_file = write_gguf(tiny("llama", bpe.get_vocab_size()), bpe, tmp_path / "m.gguf")
    out = import_gguf(gguf_file, tmp_path / "bf16", dtype="bfloat16")
    assert (
        load_model(out, dtype="bfloat16", device="cpu").model.embed_tokens.weight.dtype
        == torch.bfloat16
    )
    assert "bfloat16" in (out / "config.json").read_text()


def test_cli_model_import(tmp_path, bpe, capsys):
    gguf_file = write_gguf(tiny("qwen2", bpe.get_vocab_size()), bpe, tmp_path / "q.gguf")
    assert main(["model", "import", str(gguf_file), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert str(tmp_path / "out") in capsys.readouterr().out


def test_truncated_and_foreign_files_give_one_line_errors(tmp_path, bpe, capsys):
    gguf_file = write_gguf(tiny("llama", bpe.get_vocab_size()), bpe, tmp_path / "m.gguf")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("just some text, not a model\n")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(gguf_file.read_bytes()[:100])
    for bad, words in [
        (truncated, "truncated"),
        (foreign, "not a GGUF file"),
        (header_only, "truncated"),
    ]:
        with pytest.raises(UserError, match=words):
            import_gguf(bad, tmp_path / "never")
        assert main(["model", "import", f"gguf:{bad}", "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and words in err
    assert (
        main(["model", "import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2
    )
    assert "no such GGUF file" in capsys.readouterr().err


def test_gguf_sources_are_reward_model_backbones(tmp_path, bpe, monkeypatch):
    from prefalign.reward_models.train import build_reward_model

    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    gguf_file = write_gguf(tiny("llama", bpe.get_vocab_size()), bpe, tmp_path / "m.gguf")
    model = build_reward_model(f"gguf:{gguf_file}", pad_token_id=0)
    ids = torch.tensor([bpe.encode(TEXT).ids])
    assert model(ids).logits.shape == (1, 1)
