"""Several models on the same prompts: gold reward, KL to one reference and judge win rate.

Every model samples the same prompts with the same seed; KL is measured against the same
reference (the SFT policy); with a judge, each model's first sample per prompt is judged
against one reference answer per prompt (the reference model's own sample, unless answers
are given), so the win rates share their baseline and can be compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefalign.evaluation.core import EvalResult, RewardFn, evaluate_policy
from prefalign.evaluation.judge import JudgeConfig, judge_pairwise

TABLE_COLUMNS = ("gold_reward", "gold_reward_se", "kl", "kl_se", "accuracy",
                 "win_rate", "win_rate_ci", "lc_win_rate", "lc_ci",
                 "judge_failed", "judge_unparsed")  # fmt: skip


def compare_models(
    models: Mapping[str, str | Path],
    task: str,
    prompts: Sequence[str],
    reference: str | Path,
    judge: JudgeConfig | None = None,
    reference_answers: Sequence[str] | None = None,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 24,
    seed: int = 0,
    reward_fn: RewardFn | None = None,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """One row per model (in the order given): its EvalResult summary plus, with a judge,
    win_rate, win_rate_ci, lc_win_rate, lc_ci and the judge's counts."""
    from prefalign.modeling import load_model, load_tokenizer

    if reference_answers is not None and len(reference_answers) != len(prompts):
        raise ValueError(
            f"compare: {len(reference_answers)} reference answers for {len(prompts)} prompts"
        )
    ref_model = load_model(reference, device=device)
    if judge is not None and reference_answers is None:
        reference_answers = reference_answers_of(
            ref_model, reference, task, prompts, max_new_tokens, seed, reward_fn
        )
    rows = []
    for name, path in models.items():
        policy = load_model(path, device=device)
        result = evaluate_policy(
            policy,
            load_tokenizer(path),
            task,
            prompts,
            reference=ref_model,
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens,
            seed=seed,
            reward_fn=reward_fn,
        )
        row: dict[str, Any] = {"model": name, **result.summary()}
        if judge is not None:
            row.update(judged(prompts, result, reference_answers or [], judge, samples_per_prompt))
        rows.append(row)
        del policy  # one policy in memory at a time
    return rows


def reference_answers_of(
    ref_model: Any,
    reference: str | Path,
    task: str,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    seed: int = 0,
    reward_fn: RewardFn | None = None,
) -> list[str]:
    """The reference model's own answer to each prompt: the judge's baseline."""
    from prefalign.modeling import load_tokenizer

    own = evaluate_policy(
        ref_model, load_tokenizer(reference), task, prompts, reference=None,
        max_new_tokens=max_new_tokens, seed=seed, reward_fn=reward_fn,
    )  # fmt: skip
    return [s["response"] for s in own.samples]


JUDGE_COLUMNS = ("win_rate", "win_rate_ci", "lc_win_rate", "lc_ci", "wins", "losses", "ties",
                 "cache_hits")  # fmt: skip


def judged(
    prompts: Sequence[str],
    result: EvalResult,
    reference_answers: Sequence[str],
    judge: JudgeConfig,
    samples_per_prompt: int = 1,
) -> dict[str, Any]:
    """The judge's figures for `result` (its first sample per prompt) against the reference
    answers: win rates with intervals, counts, and the judgments it lost to errors or never
    parsed (left out of the win rate, shown as judge_failed / judge_unparsed)."""
    answers = [s["response"] for s in result.samples[::samples_per_prompt]]
    verdict = judge_pairwise(prompts, answers, reference_answers, judge).summary()
    out = {k: verdict[k] for k in JUDGE_COLUMNS}
    out.update(judge_failed=verdict["failed"], judge_unparsed=verdict["unparsed"])
    return out


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `compare_models` rows; columns no row has are left out."""
    from prefalign.evaluation.report import fmt

    columns = [c for c in TABLE_COLUMNS if any(r.get(c) is not None for r in rows)]

    def cell(v: Any) -> str:
        return "[" + ", ".join(fmt(x) for x in v) + "]" if isinstance(v, (list, tuple)) else fmt(v)

    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join([str(r["model"]), *(cell(r.get(c)) for c in columns)]) + " |"
        for r in rows
    ]
    return "\n".join(lines)
