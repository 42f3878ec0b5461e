"""The shared Trainer: metric reduction, divergence checks, train mode and dropout, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_gpt2
from transformers import GPT2LMHeadModel

from prefalign.errors import UserError
from prefalign.logprobs import collate_prompt_response, nll_loss
from prefalign.training.loop import Trainer, TrainerConfig, TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 48


def gpt2(dropout: float = 0.0) -> GPT2LMHeadModel:
    return tiny_gpt2(
        dropout=dropout, vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip


def rows(n: int = 16) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (3,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(1, VOCAB, (4,), generator=g).tolist() for _ in range(n)]
    return prompts, responses


def collate_fn(prompts, responses):
    def collate(indices: list[int]) -> dict:
        batch = collate_prompt_response(
            [prompts[i] for i in indices], [responses[i] for i in indices], 0
        )
        batch["index"] = torch.tensor(indices)
        return batch

    return collate


def config(tmp_path, **kw) -> TrainerConfig:
    base = dict(
        out_dir=str(tmp_path / "run"),
        batch_size=4,
        max_steps=2,
        lr=1e-3,
        log_every=1,
        progress=False,
    )
    return TrainerConfig(**{**base, **kw})


def metrics_lines(tmp_path) -> list[str]:
    return (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()


def test_metrics_given_as_sums_and_counts_average_over_the_examples_that_have_them(tmp_path):
    # Two micro-batches per step; only the second holds "rejected" examples. A per-micro-batch
    # mean would halve that metric (or drop it); a (sum, count) pair averages the right rows.
    prompts, responses = rows(8)
    seen: list[torch.Tensor] = []

    def loss_fn(model, batch):
        index = batch["index"].float()
        rejected = index >= 100  # never true: the metric has no rows in this run
        chosen = torch.ones_like(index, dtype=torch.bool)
        seen.append(index)
        return nll_loss(model, batch), {
            "index/chosen": (index[chosen].sum(), chosen.sum()),
            "index/rejected": (index[rejected].sum(), rejected.sum()),
        }

    trainer = Trainer(gpt2(), config(tmp_path, batch_size=2, grad_accum=2, max_steps=2), [7] * 8)
    result = trainer.fit(collate_fn(prompts, responses), loss_fn)
    for step, record in enumerate(result.history):
        mine = torch.cat(seen[2 * step : 2 * step + 2])
        assert record["index/chosen"] == pytest.approx(float(mine.mean()))
        assert record["index/rejected"] is None  # no rows: null, not 0 and not NaN
    for line in metrics_lines(tmp_path):
        assert json.loads(line)["index/rejected"] is None


def test_a_non_finite_gradient_stops_before_the_step_and_names_no_checkpoint(tmp_path):
    prompts, responses = rows()
    model = gpt2()

    def loss_fn(model, batch):
        loss = nll_loss(model, batch)
        # Finite loss, NaN gradient: sqrt has an infinite slope at 0, times 0 is NaN.
        return loss + 0.0 * torch.sqrt(torch.zeros(()) * loss), {}

    trainer = Trainer(model, config(tmp_path, save_every=1), [7] * 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TrainingDiverged, match="gradient norm") as err:
        trainer.fit(collate_fn(prompts, responses), loss_fn)
    assert isinstance(err.value, UserError)
    assert "no checkpoint" in str(err.value)
    assert "\n" not in str(err.value)
    for n, p in model.named_parameters():  # the poisoned step was never applied
        assert torch.equal(p, before[n]), n
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_divergence_names_the_last_finite_checkpoint_and_never_writes_nan(tmp_path):
    prompts, responses = rows()
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss = nll_loss(model, batch)
        if calls[0] >= 3:  # step 3: a NaN gradient under a finite loss
            loss = loss + 0.0 * torch.sqrt(torch.zeros(()) * loss)
        return loss, {"odd": torch.tensor(float("nan"))}

    trainer = Trainer(gpt2(), config(tmp_path, save_every=1, max_steps=4), [7] * 16)
    with pytest.raises(TrainingDiverged, match="step 3") as err:
        trainer.fit(collate_fn(prompts, responses), loss_fn)
    root = tmp_path / "run" / "checkpoints"
    assert str(root / "step-2") in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]
    for line in metrics_lines(tmp_path):  # strict JSON: no bare NaN
        record = json.loads(
            line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")
        )
        assert record["odd"] is None


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_train_mode_and_dropout_are_set_once_and_constant(tmp_path, disable_dropout):
    # from_pretrained returns a model in eval mode; the Trainer must put it in train mode at the
    # start, keep it there across evaluations, and apply `disable_dropout` for the whole run.
    prompts, responses = rows()
    model = gpt2(dropout=0.3).eval()
    states: list[tuple[bool, bool]] = []

    def loss_fn(model, batch):
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        states.append((model.training, any(m.p > 0 for m in dropouts)))
        return nll_loss(model, batch), {}

    def evaluate(step):
        model.eval()  # evaluators switch to eval mode; the Trainer switches back
        return {"x": 1.0}

    cfg = config(tmp_path, max_steps=4, eval_every=1, disable_dropout=disable_dropout)
    Trainer(model, cfg, [7] * 16).fit(collate_fn(prompts, responses), loss_fn, evaluate=evaluate)
    assert states == [(True, not disable_dropout)] * 4


def test_preference_training_disables_dropout_by_default():
    from prefalign.training.preference import PreferenceConfig
    from prefalign.training.sft import SFTConfig

    assert PreferenceConfig().trainer.disable_dropout is True  # as TRL's DPO and KTO trainers
    assert SFTConfig().trainer.disable_dropout is False


def test_non_finite_values_are_written_as_null(tmp_path):
    prompts, responses = rows()

    def loss_fn(model, batch):
        return nll_loss(model, batch), {"inf": torch.tensor(math.inf)}

    Trainer(gpt2(), config(tmp_path), [7] * 16).fit(collate_fn(prompts, responses), loss_fn)
    for line in metrics_lines(tmp_path):
        assert json.loads(line, parse_constant=lambda c: pytest.fail(c))["inf"] is None


def test_final_link_is_replaced_atomically_and_kept_by_a_rename(tmp_path):
    from prefalign.training.checkpoint import keep_final, point_final

    out = tmp_path / "run"
    for step in (1, 2):
        model = out / "checkpoints" / f"step-{step}" / "model"
        model.mkdir(parents=True)
        (model / "weights").write_text(str(step))
        point_final(out, model.parent)
        assert (out / "final" / "weights").read_text() == str(step)
    # A kill between keep_final's two renames leaves the model staged; a rerun finishes the job.
    (out / "checkpoints" / "step-2" / "model").rename(out / ".final.keep")
    keep_final(out)
    assert not (out / "final").is_symlink() and (out / "final" / "weights").read_text() == "2"
    point_final(out, out / "checkpoints" / "step-1")  # a materialized final is replaced too
    assert (out / "final").is_symlink() and (out / "final" / "weights").read_text() == "1"
    keep_final(out)
    assert not (out / "checkpoints" / "step-1" / "model").exists()
    assert (out / "final" / "weights").read_text() == "1"


def train_steps(
    tmp_path, name: str, before_fit=None, **kw
) -> tuple[Trainer, torch.nn.Module, list[dict]]:
    prompts, responses = rows()
    model = gpt2()  # tied input and output embeddings: two uses of one parameter
    cfg = config(tmp_path / name, max_steps=3, weight_decay=0.01, schedule="linear", **kw)
    trainer = Trainer(model, cfg, [7] * 16)
    if before_fit is not None:
        before_fit(trainer)
    result = trainer.fit(collate_fn(prompts, responses), lambda m, b: (nll_loss(m, b), {}))
    return trainer, model, result.history


def test_stepping_inside_backward_equals_the_step_after_it(tmp_path, monkeypatch):
    import prefalign.logprobs as logprobs

    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", VOCAB * 5)  # several checkpointed chunks
    inside, model_inside, history_inside = train_steps(tmp_path, "inside", max_grad_norm=0)
    after, model_after, history_after = train_steps(
        tmp_path, "after", max_grad_norm=0, step_in_backward="off"
    )
    assert inside.in_backward is not None and after.in_backward is None
    for (name, a), b in zip(model_inside.named_parameters(), model_after.parameters(), strict=True):
        assert torch.equal(a, b), name
    for x, y in zip(history_inside, history_after, strict=True):
        assert x["loss"] == y["loss"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-6)
    state_in, state_after = inside.optimizer.state_dict(), after.optimizer.state_dict()
    for key, s in state_in["state"].items():
        for field, value in s.items():
            assert torch.equal(value, state_after["state"][key][field]), (key, field)


def test_gradients_stepped_inside_backward_never_coexist(tmp_path):
    prompts, responses = rows()
    model = gpt2()
    trainer = Trainer(model, config(tmp_path, max_grad_norm=0), [7] * 16)
    params = [p for p in model.parameters() if p.requires_grad]
    alive: list[int] = []
    for p in params:  # runs after the trainer's own hook on the same parameter
        p.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(q.grad is not None for q in params))
        )
    trainer.fit(collate_fn(prompts, responses), lambda m, b: (nll_loss(m, b), {}))
    assert len(alive) == 2 * len(params) and max(alive) == 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_grad_norm=1.0),
        dict(max_grad_norm=0, grad_accum=2, batch_size=2),
    ],
)
def test_clipping_or_accumulation_keep_the_step_after_backward(tmp_path, kw):
    assert Trainer(gpt2(), config(tmp_path, **kw), [7] * 16).in_backward is None


def test_a_non_finite_gradient_inside_backward_stops_the_run_unsaved(tmp_path):
    prompts, responses = rows()

    def loss_fn(model, batch):
        loss = nll_loss(model, batch)
        return loss + 0.0 * torch.sqrt(torch.zeros(()) * loss), {}

    trainer = Trainer(gpt2(), config(tmp_path, max_grad_norm=0, save_every=1), [7] * 16)
    assert trainer.in_backward is not None
    with pytest.raises(TrainingDiverged, match="gradient became nan at step 1") as err:
        trainer.fit(collate_fn(prompts, responses), loss_fn)
    assert "nothing was saved" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
