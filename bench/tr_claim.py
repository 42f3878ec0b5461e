"""The trust-region claim on the toy world: at equal KL from the initial policy, does a moving
reference (TR-DPO, Gorbatovski et al. 2024) reach a better gold reward than a frozen one?

The regime where the claim can show: about 128 preference pairs labelled by VADER (with
Bradley-Terry noise), 256 DPO steps at a constant learning rate (32 epochs), so the policy
over-optimises the labeller. The gold reward is VADER times coherence, the share of the reply's
word bigrams that the toy grammar can produce (enumerated from the grammar): degenerate positive
text pleases the labeller but not the gold. Every 16 steps each run records gold, VADER and
coherence (with standard errors), KL to the SFT policy, the log-probs of the training chosen and
rejected responses and the share of samples holding an off-grammar bigram.

Arms: frozen at beta 0.05/0.1/0.3; at beta 0.1 hard tau 8/32/64, soft alpha 0.6 every 4 and 16
steps, soft alpha 0.1 every step; the best TR setting (chosen on a tuning seed that is not
reported) at the other betas. A Gao et al. (2023) arm: a Bradley-Terry reward model trained on
the VADER-labelled pairs relabels the training pairs (a proxy labeller), with best-of-N on the
SFT policy (KL = log N - (N-1)/N) as a calibration curve.

    python bench/tr_claim.py --out bench/results/tr_claim            # the full experiment
    python bench/tr_claim.py --out /tmp/trc --seeds 0 --steps 32     # a smaller one

Runs go to `--workers` processes with one thread each; each finished run is saved, so an
interrupted experiment resumes. Prints the tables and writes results.json, report.md and plots.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

BUDGETS = (2.0, 4.0, 8.0, 16.0, 32.0)  # KL budgets, nats per sequence
BETAS = (0.05, 0.1, 0.3)
MAIN_BETA = 0.1
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 9: 2.262}


@dataclass(frozen=True)
class Arm:
    """One training setting: a reference mode at a beta, on the VADER pairs or the proxy's."""

    mode: str  # frozen | soft | hard
    beta: float
    alpha: float = 0.6
    period: int = 1
    tau: int = 512
    labeller: str = "vader"  # vader | proxy (the Bradley-Terry reward model)

    @property
    def name(self) -> str:
        setting = {
            "frozen": "frozen",
            "soft": f"soft-a{self.alpha}-p{self.period}",
            "hard": f"hard-tau{self.tau}",
        }[self.mode]
        prefix = "proxy-" if self.labeller == "proxy" else ""
        return f"{prefix}{setting}-b{self.beta}"

    @property
    def setting(self) -> str:
        """The reference setting without beta or labeller."""
        return self.name.removeprefix("proxy-").rsplit("-b", 1)[0]

    def at(self, beta: float, labeller: str | None = None) -> Arm:
        return replace(self, beta=beta, labeller=labeller or self.labeller)


FROZEN = Arm("frozen", MAIN_BETA)
TR_SETTINGS = (
    Arm("hard", MAIN_BETA, tau=8),
    Arm("hard", MAIN_BETA, tau=32),
    Arm("hard", MAIN_BETA, tau=64),
    Arm("soft", MAIN_BETA, alpha=0.6, period=4),
    Arm("soft", MAIN_BETA, alpha=0.6, period=16),
    Arm("soft", MAIN_BETA, alpha=0.1, period=1),
)


@dataclass(frozen=True)
class Setup:
    world_dir: str
    pairs_path: str  # the VADER-labelled training pairs
    proxy_pairs_path: str  # the same pairs relabelled by the proxy reward model
    steps: int
    every: int
    lr: float
    batch_size: int
    n_eval_prompts: int
    samples_per_prompt: int
    max_new_tokens: int
    out_dir: str


# --- one run ------------------------------------------------------------------------------------
def checkpoint_metrics(
    policy,
    sft,
    tokenizer,
    prompts: list[str],
    pairs_batch: dict,
    setup: Setup,
    seed: int,
    step: int,
) -> dict[str, float]:
    """Gold, VADER, coherence (with standard errors), KL to SFT, training-pair log-probs."""
    import torch

    from prefalign.evaluation.core import evaluate_policy, mean_and_se
    from prefalign.logprobs import sequence_logps, split_pairs
    from prefalign.toy.rewards import coherence, coherent_sentiment_reward, sentiment_reward

    result = evaluate_policy(
        policy,
        tokenizer,
        "sentiment",
        prompts,
        reference=sft,
        reward_fn=coherent_sentiment_reward,
        samples_per_prompt=setup.samples_per_prompt,
        max_new_tokens=setup.max_new_tokens,
        seed=1000 * seed + step,  # the same samples' noise for every arm of a seed and step
    )
    texts = [(s["prompt"], s["response"]) for s in result.samples]
    vader = mean_and_se([sentiment_reward(p, r) for p, r in texts])
    coh = [coherence(p, r) for p, r in texts]
    with torch.no_grad():
        chosen, rejected = split_pairs(sequence_logps(policy, *pairs_batch.values()))
    return {
        "step": step,
        "gold": result.gold_reward,
        "gold_se": result.gold_reward_se,
        "vader": vader[0],
        "vader_se": vader[1],
        "coherence": mean_and_se(coh)[0],
        "coherence_se": mean_and_se(coh)[1],
        "off_grammar": sum(c < 1 for c in coh) / len(coh),
        "kl": result.kl,
        "kl_se": result.kl_se,
        "mean_length": result.mean_length,
        "logp_chosen": chosen.sum.mean().item(),
        "logp_rejected": rejected.sum.mean().item(),
    }


def train_arm(job: tuple[Arm, int, Setup]) -> dict:
    """Train one arm with one seed from the SFT policy with `prefalign train`'s recipe, a
    checkpoint every `every` steps; then measure step 0 and every checkpoint."""
    import shutil

    import torch

    torch.set_num_threads(1)
    arm, seed, setup = job
    saved = Path(setup.out_dir) / "runs" / f"{arm.name}-s{seed}.json"
    if saved.exists():
        return json.loads(saved.read_text())
    from prefalign.config import load_config
    from prefalign.data import collate_pairs, load_preference_data, tokenize_preference
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.toy.world import ToyWorld
    from prefalign.training.checkpoint import checkpoints
    from prefalign.training.preference import PreferenceConfig, run_preference

    started = time.perf_counter()
    world = ToyWorld("sentiment", Path(setup.world_dir))
    pairs_path = setup.proxy_pairs_path if arm.labeller == "proxy" else setup.pairs_path
    out = Path(setup.out_dir) / "scratch" / f"{arm.name}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"model.name_or_path={world.policy_path}",
        f"data.path={pairs_path}",
        "data.max_length=64",
        "data.max_prompt_length=16",
        "objective.name=dpo",
        f"objective.params={{beta: {arm.beta}}}",
        f"reference.mode={arm.mode}",
        f"reference.alpha={arm.alpha}",
        f"reference.period={arm.period}",
        f"reference.tau={arm.tau}",
        f"trainer.out_dir={out}",
        f"trainer.batch_size={setup.batch_size}",
        f"trainer.max_steps={setup.steps}",
        f"trainer.lr={setup.lr}",
        "trainer.schedule=constant",
        "trainer.warmup_ratio=0",
        f"trainer.seed={seed}",
        f"trainer.save_every={setup.every}",
        f"trainer.keep_checkpoints={setup.steps // setup.every + 1}",
        f"trainer.log_every={setup.every}",
        "trainer.progress=false",
    ]
    run_preference(load_config(PreferenceConfig, None, overrides), log=lambda *_: None)
    trained = time.perf_counter() - started

    tokenizer = load_tokenizer(world.policy_path)
    sft = load_model(world.policy_path, device="cpu")
    records = load_preference_data(pairs_path, tokenizer=tokenizer).records
    pairs, _ = tokenize_preference(records, tokenizer, max_length=64, max_prompt_length=16)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    pairs_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    prompts = world.prompts("eval")[: setup.n_eval_prompts]
    points = [checkpoint_metrics(sft, sft, tokenizer, prompts, pairs_batch, setup, seed, 0)]
    for step, path in sorted(checkpoints(out)):
        policy = load_model(path / "model", device="cpu")
        points.append(
            checkpoint_metrics(policy, sft, tokenizer, prompts, pairs_batch, setup, seed, step)
        )
    shutil.rmtree(out, ignore_errors=True)  # the curve is the result, not the weights
    run = {
        "arm": arm.name,
        "setting": arm.setting,
        "beta": arm.beta,
        "labeller": arm.labeller,
        "seed": seed,
        "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "points": points,
    }
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(run, indent=1))
    return run


# --- summaries ----------------------------------------------------------------------------------
def best_within(points: list[dict], budget: float) -> float:
    """The best gold among checkpoints whose estimated KL is at most `budget` (step 0 counts)."""
    return max(p["gold"] for p in points if p["kl"] <= budget or p["step"] == 0)


def mean_interval(values: list[float]) -> dict[str, float]:
    """Mean and a 95% t-interval over seeds."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": n}
    half = T_975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def budget_score(points: list[dict]) -> float:
    """The tuning criterion: best gold within each KL budget, averaged over the budgets."""
    return sum(best_within(points, b) for b in BUDGETS) / len(BUDGETS)


def paired_differences(
    runs: dict[tuple[str, int], dict], arm: str, base: str, seeds: list[int]
) -> dict:
    """Per KL budget: seed-paired (arm - base) best gold within it, mean and 95% interval."""
    out = {}
    for budget in BUDGETS:
        diffs = [
            best_within(runs[arm, s]["points"], budget)
            - best_within(runs[base, s]["points"], budget)
            for s in seeds
        ]
        out[str(budget)] = {**mean_interval(diffs), "per_seed": diffs}
    return out


def verdict(differences: dict) -> str:
    """The decision rule stated in the README before the experiment ran."""
    above = sum(d["lo"] > 0 for d in differences.values())
    below = sum(d["hi"] < 0 for d in differences.values())
    if above >= 2 and below == 0:
        return "supported"
    if below >= 2 and above == 0:
        return "refuted"
    if above == below == 0 and all(abs(d["mean"]) < 0.03 for d in differences.values()):
        return "no effect at this resolution"
    return "inconclusive"


def band(runs: list[dict], key: str) -> list[dict[str, float]]:
    """Per checkpoint, the mean and standard error over seeds of `key` (and of sqrt KL)."""
    out = []
    for i, point in enumerate(runs[0]["points"]):
        values = [r["points"][i][key] for r in runs]
        roots = [math.sqrt(max(r["points"][i]["kl"], 0.0)) for r in runs]
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        out.append(
            {
                "step": point["step"],
                "mean": sum(values) / len(values),
                "se": se,
                "sqrt_kl": sum(roots) / len(roots),
            }
        )
    return out


def binned_gold(runs: list[dict], width: float = 1.0) -> list[dict[str, float]]:
    """Gold against sqrt KL: checkpoints binned by sqrt KL (bins of `width`); per bin, each
    seed's mean gold, then the mean and standard error over the seeds that reach the bin."""
    bins: dict[int, dict[int, list[float]]] = {}
    for i, run in enumerate(runs):
        for p in run["points"]:
            k = int(math.sqrt(max(p["kl"], 0.0)) // width)
            bins.setdefault(k, {}).setdefault(i, []).append(p["gold"])
    out = []
    for k in sorted(bins):
        per_seed = [sum(v) / len(v) for v in bins[k].values()]
        se = statistics.stdev(per_seed) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else 0.0
        out.append(
            {
                "sqrt_kl": (k + 0.5) * width,
                "mean": sum(per_seed) / len(per_seed),
                "se": se,
                "seeds": len(per_seed),
            }
        )
    return out


# --- best-of-N calibration ----------------------------------------------------------------------
def best_of_n_kl(n: int) -> float:
    """KL of best-of-N from the base policy (Stiennon et al. 2020; Gao et al. 2023)."""
    return math.log(n) - (n - 1) / n


def best_of_n(setup: Setup, proxy_dir: Path, n_max: int = 16) -> list[dict]:
    """Best-of-N on the SFT policy, picked by the proxy reward model and by VADER itself."""
    import torch

    from prefalign.evaluation.core import mean_and_se
    from prefalign.generation import SamplingParams, generate
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.reward_models import RewardModel
    from prefalign.toy.rewards import coherent_sentiment_reward, sentiment_reward
    from prefalign.toy.world import ToyWorld

    torch.set_num_threads(1)
    world = ToyWorld("sentiment", Path(setup.world_dir))
    tokenizer = load_tokenizer(world.policy_path)
    policy = load_model(world.policy_path, device="cpu")
    prompts = world.prompts("eval")[: setup.n_eval_prompts]
    expanded = [p for p in prompts for _ in range(n_max)]
    params = SamplingParams(
        max_new_tokens=setup.max_new_tokens, temperature=1.0, seed=7, batch_size=256
    )
    texts = [g.text for g in generate(policy, tokenizer, expanded, params)]
    gold = [coherent_sentiment_reward(p, t) for p, t in zip(expanded, texts, strict=True)]
    scores = {
        "proxy": RewardModel.from_pretrained(proxy_dir).score(expanded, texts),
        "vader": [sentiment_reward(p, t) for p, t in zip(expanded, texts, strict=True)],
    }
    rows = []
    n = 1
    while n <= n_max:
        row = {"n": n, "kl": best_of_n_kl(n)}
        for selector, score in scores.items():
            picks = []
            for k in range(len(prompts)):
                group = range(k * n_max, k * n_max + n)
                picks.append(gold[max(group, key=lambda i: score[i])])
            row[f"gold_{selector}"], row[f"gold_{selector}_se"] = mean_and_se(picks)
        rows.append(row)
        n *= 2
    return rows


# --- data ---------------------------------------------------------------------------------------
def prepare_data(world, out: Path, n_pairs: int, log) -> tuple[Path, Path, Path, dict]:
    """The first `n_pairs` training pairs; a reward model trained on all the world's training
    pairs; the same pairs relabelled by it (chosen = the higher proxy score)."""
    from prefalign.config import load_config
    from prefalign.reward_models import RewardModel, RewardModelConfig, train_reward_model

    rows = [json.loads(line) for line in world.file("pairs.jsonl").read_text().splitlines()]
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows[:n_pairs]))
    proxy_dir = out / "proxy_rm"
    if not (proxy_dir / "final" / "config.json").exists():
        config = load_config(
            RewardModelConfig,
            None,
            [
                f"model.name_or_path={world.policy_path}",
                f"data.path={world.file('pairs.jsonl')}",
                f"data.eval_path={world.file('pairs_eval.jsonl')}",
                "data.max_length=64",
                "data.max_prompt_length=16",
                f"trainer.out_dir={proxy_dir}",
                "trainer.batch_size=16",
                "trainer.epochs=3",
                "trainer.lr=1e-4",
                "trainer.progress=false",
                "trainer.log_every=100",
            ],
        )
        train_reward_model(config, log=lambda *_: None)
    rm_metrics = json.loads((proxy_dir / "rm_metrics.json").read_text())
    log(f"proxy reward model: held-out pair accuracy {rm_metrics['held_out_pair_accuracy']:.3f}")
    rm = RewardModel.from_pretrained(proxy_dir)
    prompts = [r["prompt"] for r in rows[:n_pairs]]
    chosen = rm.score(prompts, [r["chosen"] for r in rows[:n_pairs]])
    rejected = rm.score(prompts, [r["rejected"] for r in rows[:n_pairs]])
    relabelled, flipped = [], 0
    for row, c, r in zip(rows[:n_pairs], chosen, rejected, strict=True):
        if r > c:
            flipped += 1
            row = {
                **row,
                "chosen": row["rejected"],
                "rejected": row["chosen"],
                "chosen_reward": row["rejected_reward"],
                "rejected_reward": row["chosen_reward"],
            }
        relabelled.append(row)
    proxy_pairs = out / "pairs_proxy.jsonl"
    proxy_pairs.write_text("".join(json.dumps(r) + "\n" for r in relabelled))
    rm_metrics["flipped_training_pairs"] = flipped
    return pairs, proxy_pairs, proxy_dir / "final", rm_metrics


# --- the experiment -----------------------------------------------------------------------------
def run_jobs(
    jobs: list[tuple[Arm, int, Setup]], workers: int, log, deadline: float = math.inf
) -> list[dict]:
    """Run the jobs in order (the first are the most important); none starts after `deadline`
    (a time.time()), and the pool stops there: finished runs are saved, the rest are absent."""
    done = []
    if workers <= 1:
        for job in jobs:
            if time.time() > deadline:
                break
            done.append(log_run(train_arm(job), log))
        return done
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        pending = [pool.apply_async(train_arm, (job,)) for job in jobs]
        for result in pending:
            left = deadline - time.time()
            if left <= 0:
                break
            try:
                done.append(log_run(result.get(timeout=min(left, 1e6)), log))
            except multiprocessing.TimeoutError:
                break
    finally:
        pool.terminate()
        pool.join()
    if len(done) < len(jobs):
        log(f"deadline: {len(done)} of {len(jobs)} runs finished; the others are left out")
    return done


def log_run(run: dict, log) -> dict:
    best = max(run["points"], key=lambda p: p["gold"])
    last = run["points"][-1]
    log(
        f"  {run['arm']} seed {run['seed']}: best gold {best['gold']:.3f} at KL {best['kl']:.1f} "
        f"(step {best['step']}); last {last['gold']:.3f} at KL {last['kl']:.1f}, off-grammar "
        f"{last['off_grammar']:.0%} ({run['seconds']:.0f}s)"
    )
    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/tr_claim")
    parser.add_argument("--world-dir", help="an existing sentiment world (default: the cached one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune-seed", type=int, default=3)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--every", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2, help="samples per evaluation prompt")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-proxy", action="store_true", help="skip the Gao-style proxy arm")
    parser.add_argument(
        "--deadline-minutes",
        type=float,
        default=math.inf,
        help="start no reported run after this many minutes (arms left incomplete are dropped)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from prefalign.toy.world import ToyWorld, get_world

    world = (
        ToyWorld("sentiment", Path(args.world_dir)) if args.world_dir else get_world("sentiment")
    )
    log = print
    pairs, proxy_pairs, proxy_dir, rm_metrics = prepare_data(world, out, args.pairs, log)
    setup = Setup(
        str(world.root),
        str(pairs),
        str(proxy_pairs),
        args.steps,
        args.every,
        args.lr,
        args.batch_size,
        args.eval_prompts,
        args.samples,
        world.info()["config"]["max_new_tokens"],
        str(out),
    )

    deadline = time.time() + 60 * args.deadline_minutes
    log(f"tuning on seed {args.tune_seed} (not reported): {len(TR_SETTINGS)} TR settings")
    tuning = run_jobs([(a, args.tune_seed, setup) for a in TR_SETTINGS], args.workers, log)
    scores = {r["arm"]: budget_score(r["points"]) for r in tuning}
    best_tr = max(TR_SETTINGS, key=lambda a: scores[a.name])
    log(f"best TR setting on the tuning seed: {best_tr.setting} (score {scores[best_tr.name]:.3f})")

    # In order of importance, so that a deadline cuts the secondary arms: the primary pair, the
    # other TR settings, each other beta's pair, the proxy labeller's pair.
    arms = [FROZEN, best_tr] + [a for a in TR_SETTINGS if a != best_tr]
    for beta in (b for b in BETAS if b != MAIN_BETA):
        arms += [FROZEN.at(beta), best_tr.at(beta)]
    if not args.no_proxy:
        arms += [FROZEN.at(MAIN_BETA, "proxy"), best_tr.at(MAIN_BETA, "proxy")]
    jobs = [(a, s, setup) for a in arms for s in args.seeds]
    log(f"{len(jobs)} reported runs: {len(arms)} arms x seeds {args.seeds}")
    runs = {(r["arm"], r["seed"]): r for r in run_jobs(jobs, args.workers, log, deadline)}
    arms = [a for a in arms if all((a.name, s) in runs for s in args.seeds)]
    bon = [] if args.no_proxy else best_of_n(setup, proxy_dir)

    comparisons = {}
    for arm in arms:
        if arm.mode != "frozen":
            base = FROZEN.at(arm.beta, arm.labeller)
            if any(b.name == base.name for b in arms):
                diffs = paired_differences(runs, arm.name, base.name, args.seeds)
                comparisons[arm.name] = {
                    "against": base.name,
                    "budgets": diffs,
                    "verdict": verdict(diffs),
                }
    results = {
        "settings": {k: v for k, v in asdict(setup).items() if k not in ("out_dir",)},
        "seeds": args.seeds,
        "tune_seed": args.tune_seed,
        "tuning_scores": scores,
        "best_tr_setting": best_tr.setting,
        "proxy_rm": rm_metrics,
        "best_of_n": bon,
        "comparisons": comparisons,
        "binned_gold": {a.name: binned_gold([runs[a.name, s] for s in args.seeds]) for a in arms},
        "bands": {
            a.name: {
                k: band([runs[a.name, s] for s in args.seeds], k)
                for k in (
                    "gold",
                    "vader",
                    "coherence",
                    "off_grammar",
                    "logp_chosen",
                    "logp_rejected",
                    "kl",
                )
            }
            for a in arms
        },
        "runs": [runs[a.name, s] for a in arms for s in args.seeds],
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(results, arms, out)
    print(report)
    log(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots in {results['seconds']:.0f}s")
    return results


# --- report and plots ---------------------------------------------------------------------------
def write_report(results: dict, arms: list[Arm], out: Path) -> str:
    lines = [
        f"# Trust-region claim: {len(results['runs'])} runs, seeds {results['seeds']}, "
        f"{results['seconds']:.0f}s",
        "",
        f"Best TR setting on tuning seed {results['tune_seed']}: {results['best_tr_setting']}.",
        "",
        "Best gold within a KL budget, mean over seeds "
        "(TR minus frozen, seed-paired, 95% interval):",
        "",
        "| arm | " + " | ".join(f"KL<={b:g}" for b in BUDGETS) + " | verdict |",
        "|---|" + "---|" * (len(BUDGETS) + 1),
    ]
    seeds = results["seeds"]
    by_key = {(r["arm"], r["seed"]): r for r in results["runs"]}
    for arm in arms:
        cells = []
        for budget in BUDGETS:
            best = mean_interval(
                [best_within(by_key[arm.name, s]["points"], budget) for s in seeds]
            )
            cell = f"{best['mean']:.3f}"
            if arm.name in results["comparisons"]:
                d = results["comparisons"][arm.name]["budgets"][str(budget)]
                cell += f" ({d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}])"
            cells.append(cell)
        verdict_cell = results["comparisons"].get(arm.name, {}).get("verdict", "")
        lines.append(f"| {arm.name} | " + " | ".join(cells) + f" | {verdict_cell} |")
    lines += [
        "",
        "At the last checkpoint (mean ± se over seeds):",
        "",
        "| arm | gold | VADER | coherence | off-grammar | KL | logp chosen | logp rejected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        b = results["bands"][arm.name]
        cells = [
            f"{b[k][-1]['mean']:.3f} ± {b[k][-1]['se']:.3f}" for k in ("gold", "vader", "coherence")
        ]
        cells += [
            f"{b['off_grammar'][-1]['mean']:.0%}",
            f"{b['kl'][-1]['mean']:.1f} ± {b['kl'][-1]['se']:.1f}",
        ]
        cells += [f"{b[k][-1]['mean']:.1f}" for k in ("logp_chosen", "logp_rejected")]
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    if results["best_of_n"]:
        lines += [
            "",
            f"Proxy reward model: {json.dumps(results['proxy_rm'])}",
            "",
            "Best-of-N on the SFT policy (KL = log N - (N-1)/N):",
            "",
            "| N | KL | gold, picked by the proxy RM | gold, picked by VADER |",
            "|---|---|---|---|",
        ]
        for row in results["best_of_n"]:
            lines.append(
                f"| {row['n']} | {row['kl']:.2f} | "
                f"{row['gold_proxy']:.3f} ± {row['gold_proxy_se']:.3f}"
                f" | {row['gold_vader']:.3f} ± {row['gold_vader_se']:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    plot(results, arms, out)
    return text


def plot(results: dict, arms: list[Arm], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BETAS), figsize=(5 * len(BETAS), 4), sharey=True)
    for ax, beta in zip(axes, BETAS, strict=True):
        for arm in (a for a in arms if a.beta == beta):
            pts = results["binned_gold"][arm.name]
            x = [p["sqrt_kl"] for p in pts]
            y = [p["mean"] for p in pts]
            (line,) = ax.plot(x, y, marker=".", label=arm.name.removesuffix(f"-b{beta}"))
            ax.fill_between(
                x,
                [p["mean"] - p["se"] for p in pts],
                [p["mean"] + p["se"] for p in pts],
                color=line.get_color(),
                alpha=0.2,
            )
        if beta == MAIN_BETA and results["best_of_n"]:
            bon = results["best_of_n"]
            ax.plot(
                [math.sqrt(r["kl"]) for r in bon],
                [r["gold_proxy"] for r in bon],
                "k--",
                label="best-of-N (proxy RM)",
            )
        ax.set_title(f"beta {beta}")
        ax.set_xlabel("sqrt KL to SFT (checkpoints binned by 1 nat^0.5)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("gold = VADER x coherence (band: ± se over seeds)")
    fig.tight_layout()
    fig.savefig(out / "gold_vs_sqrt_kl.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results["comparisons"])
    for i, name in enumerate(names):
        budgets = results["comparisons"][name]["budgets"]
        xs = [j + (i - len(names) / 2) * 0.08 for j in range(len(BUDGETS))]
        means = [budgets[str(b)]["mean"] for b in BUDGETS]
        errs = [
            [m - budgets[str(b)]["lo"] for m, b in zip(means, BUDGETS, strict=True)],
            [budgets[str(b)]["hi"] - m for m, b in zip(means, BUDGETS, strict=True)],
        ]
        ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=2, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(BUDGETS)), [f"KL<={b:g}" for b in BUDGETS])
    ax.set_ylabel("best gold, TR minus frozen (95% interval)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "best_gold_within_budget.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
