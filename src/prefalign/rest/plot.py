"""The per-step curve of a ReST run: rewards, kept fraction and KL over the Grow/Improve steps."""

from __future__ import annotations

from pathlib import Path


def step_label(record: dict) -> str:
    if record["kind"] == "initial":
        return "init"
    if record["kind"] == "grow":
        return f"G{record['grow']}"
    return f"I{record['grow']}.{record['improve']}"


def plot_steps(records: list[dict], path: str | Path, title: str = "ReST") -> Path:
    """Three panels sharing the step axis: (1) the grown set's training reward (mean, p10-p90) and
    the held-out training and gold rewards (and accuracy); (2) kept fraction and threshold;
    (3) KL(policy || initial) on held-out prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(records)))
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)

    for key, color, label, dx in (
        ("reward", "C0", "grown set: training reward", -0.08),
        ("gold_reward", "C1", "grown set: gold reward", 0.08),
    ):
        grown = [
            (x, r[key])
            for x, r in zip(xs, records, strict=True)
            if r["kind"] == "grow" and r.get(key)
        ]
        if grown:
            means = [d["mean"] for _, d in grown]
            # A skewed distribution can put its mean outside p10-p90: clip the bars at the mean.
            spread = [
                [max(0.0, m - d["p10"]) for m, (_, d) in zip(means, grown, strict=True)],
                [max(0.0, d["p90"] - m) for m, (_, d) in zip(means, grown, strict=True)],
            ]
            top.errorbar(
                [x + dx for x, _ in grown],
                means,
                yerr=spread,
                fmt="s",
                color=color,
                alpha=0.6,
                capsize=4,
                label=f"{label} (mean, p10-p90)",
            )
    evals = [(x, r["eval"]) for x, r in zip(xs, records, strict=True) if r.get("eval")]
    for key, style, label in (
        ("reward", "o-", "held-out: training reward"),
        ("gold_reward", "D-", "held-out: gold reward"),
        ("accuracy", "^--", "held-out: accuracy"),
    ):
        pts = [(x, e[key]) for x, e in evals if e.get(key) is not None]
        if pts:
            top.plot([x for x, _ in pts], [v for _, v in pts], style, label=label)
    top.set_ylabel("reward")
    top.legend(fontsize=7)
    top.grid(alpha=0.3)
    top.set_title(title)

    improves = [(x, r) for x, r in zip(xs, records, strict=True) if r["kind"] == "improve"]
    if improves:
        mid.bar(
            [x for x, _ in improves],
            [r["kept_fraction"] for _, r in improves],
            color="C2",
            alpha=0.6,
            label="kept fraction",
        )
        mid.plot(
            [x for x, _ in improves],
            [r["threshold"] for _, r in improves],
            "k.--",
            label="threshold",
        )
    mid.set_ylabel("kept / threshold")
    mid.legend(fontsize=7)
    mid.grid(alpha=0.3)

    kls = [(x, e["kl"]) for x, e in evals if e.get("kl") is not None]
    if kls:
        low.plot([x for x, _ in kls], [v for _, v in kls], "o-", color="C3")
    low.set_ylabel("KL(policy || initial)")
    low.set_xticks(xs, [step_label(r) for r in records], fontsize=7)
    low.set_xlabel("step (G: grow, I: improve)")
    low.grid(alpha=0.3)

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
