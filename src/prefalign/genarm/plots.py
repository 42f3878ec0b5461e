"""The GenARM demo's figures: the alpha sweep on the reward-KL plane, and the two-ARM trade-off."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alpha_sweep(row: dict, path: Path) -> Path:
    """Left: gold reward against KL to the base, one point per alpha, with the baselines.
    Right: gold reward and KL against alpha."""
    plt = _pyplot()
    sweep = row["sweep"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    kls, golds = [p["kl"] for p in sweep], [p["gold_reward"] for p in sweep]
    left.plot(kls, golds, marker="o", label="GenARM (sentiment ARM), alpha sweep")
    for p in sweep:
        left.annotate(
            f"{p['alpha']:g}",
            (p["kl"], p["gold_reward"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=8,
        )
    baselines = row.get("baselines") or [b for b in (row.get("args"), row.get("best_of_n")) if b]
    for b in baselines:
        marker = "s" if "k" in b else "^"
        label = (
            f"ARGS k={b['k']}, w={b['weight']:g}"
            if "k" in b
            else f"best-of-{b['n']} (KL upper bound)"
        )
        left.plot(
            [b["kl"]],
            [b["gold_reward"]],
            marker=marker,
            linestyle="none",
            markersize=8,
            label=label,
        )
    control = row.get("control")
    if control:
        left.plot(
            [control["kl"]],
            [control["gold_reward"]],
            marker="x",
            markersize=9,
            linestyle="none",
            label=f"control: untrained ARM (SFT), alpha {control['alpha']:g}",
        )
    w2s = row.get("weak_to_strong", {})
    if "guided" in w2s:
        left.plot(
            [0.0, w2s["guided"]["kl"]],
            [w2s["base"]["gold_reward"], w2s["guided"]["gold_reward"]],
            marker="D",
            linestyle="--",
            label=f"large base + small ARM (alpha {w2s['guided']['alpha']:g})",
        )
    left.set_xlabel("KL(decoding || its base) per sequence (nats)")
    left.set_ylabel("gold reward (VADER)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    alphas = [p["alpha"] for p in sweep]
    right.plot(alphas, golds, marker="o", color="C0", label="gold reward")
    right.set_xlabel("alpha (ARM weight)")
    right.set_ylabel("gold reward", color="C0")
    twin = right.twinx()
    twin.plot(alphas, kls, marker="s", color="C3", label="KL")
    twin.set_ylabel("KL to base (nats)", color="C3")
    right.grid(alpha=0.3)
    fig.suptitle("GenARM on the sentiment toy: log pi_base + alpha * log pi_ARM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(row: dict, path: Path) -> Path:
    """Sentiment against brevity for weighted pairs of ARMs: one curve, no retraining."""
    plt = _pyplot()
    points = row["tradeoff"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(
        [p["brevity"] for p in points],
        [p["sentiment"] for p in points],
        marker="o",
        label="GenARM, two ARMs",
    )
    for p in points:
        ws, wb = p["weights"]
        ax.annotate(
            f"({ws:g}, {wb:g})",
            (p["brevity"], p["sentiment"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    base = row.get("base")
    if base:
        ax.plot(
            [base["brevity"]],
            [base["gold_reward"]],
            marker="*",
            markersize=12,
            linestyle="none",
            label="base (SFT)",
        )
    ax.set_xlabel("brevity reward")
    ax.set_ylabel("sentiment reward (VADER)")
    ax.set_title("Decode-time trade-off, ARM weights (sentiment, brevity)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
