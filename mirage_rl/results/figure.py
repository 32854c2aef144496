"""The figure of the report: accuracy by level per arm, with the chance levels."""

from __future__ import annotations

from ..atomic import atomic_save_figure
from .stats import mean_std


def plot(res: dict, path: str) -> None:
    """Accuracy by level per arm (mean over seeds, std as error bars, seeds as dots) with the chance levels, for both
    scoring rules; saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(res["chance"], key=int)
    arms = [a for a in res["arms"].values() if a["seeds"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / max(len(arms), 1)
    for ax, key, title in zip(axes, ("accuracy", "accuracy_strict"), ("official (VSP) rule", "strict (Mirage) rule")):
        for i, a in enumerate(arms):
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(levels))]
            vals = [[s["report"]["by_level"][lv][key] for s in a["seeds"].values()] for lv in levels]
            ms = [mean_std(v) for v in vals]
            ax.bar(xs, [m for m, _ in ms], width, yerr=[s for _, s in ms], capsize=2, label=a["label"])
            for x, v in zip(xs, vals):
                ax.scatter([x] * len(v), v, s=6, color="black", zorder=3)
        for j, lv in enumerate(levels):
            ax.hlines(res["chance"][lv]["random_plan"][key], j - 0.45, j + 0.45, colors="red", linestyles="--",
                      label="chance: random plan" if j == 0 else None)
            ax.hlines(res["chance"][lv]["best_blind_plan"][key], j - 0.45, j + 0.45, colors="gray", linestyles=":",
                      label="chance: best blind plan" if j == 0 else None)
        ax.set_xticks(range(len(levels)), [f"level {lv}" for lv in levels])
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy on the VSP test maps")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_save_figure(fig, path)
