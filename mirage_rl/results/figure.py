"""The figure of the report: accuracy by level per arm, with the chance levels."""

from __future__ import annotations

from ..atomic import atomic_save_figure
from .stats import mean_std


def plot(res: dict, path: str) -> None:
    """The task's rate metrics by level per arm (mean over seeds, std as error bars, seeds as dots) with the chance
    levels (VSP planning: both scoring rules, random and best blind plan; choice tasks: accuracy, uniform and majority
    class); saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..tasks import get_task

    task = get_task(res.get("task", "plan"))
    labels = dict(task.metrics)
    rates, baselines = res.get("rates", ["accuracy", "accuracy_strict"]), res.get("baselines", ["random_plan", "best_blind_plan"])
    levels = sorted(res["chance"], key=int)
    arms = [a for a in res["arms"].values() if a["seeds"]]
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4), sharey=True, squeeze=False)
    axes = axes[0]
    width = 0.8 / max(len(arms), 1)
    for ax, key in zip(axes, rates):
        for i, a in enumerate(arms):
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(levels))]
            vals = [[s["report"]["by_level"][lv][key] for s in a["seeds"].values()] for lv in levels]
            ms = [mean_std(v) for v in vals]
            ax.bar(xs, [m for m, _ in ms], width, yerr=[s for _, s in ms], capsize=2, label=a["label"])
            for x, v in zip(xs, vals):
                ax.scatter([x] * len(v), v, s=6, color="black", zorder=3)
        for name, colour, style in zip(baselines, ("red", "gray"), ("--", ":")):
            for j, lv in enumerate(levels):
                value = res["chance"][lv][name].get(key)
                if value is not None:
                    ax.hlines(value, j - 0.45, j + 0.45, colors=colour, linestyles=style,
                              label=f"chance: {task.chance_labels.get(name, name)}" if j == 0 else None)
        ax.set_xticks(range(len(levels)), [f"level {lv}" for lv in levels])
        ax.set_title(f"{labels[key]} rule" if task.name == "plan" else labels[key])
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy on the VSP test maps" if task.name == "plan" else f"accuracy ({task.name} test items)")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_save_figure(fig, path)


def plot_interventions(res: dict, path: str) -> bool:
    """The latent interventions of every latent arm (``focus_interventions`` of each seed): grouped bars, one group
    per intervention, one bar per arm, the mean headline accuracy over seeds on the headline levels, seeds as dots.
    Saved atomically as PNG; returns False (nothing written) when no arm ran interventions."""
    arms = [a for a in res["arms"].values() if any(s.get("interventions") for s in a["seeds"].values())]
    if not arms:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for a in arms for s in a["seeds"].values() for n in (s.get("interventions") or {})))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 4))
    width = 0.8 / len(arms)
    for i, a in enumerate(arms):
        runs = [s["interventions"] for s in a["seeds"].values() if s.get("interventions")]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(names))]
        vals = [[r[n]["accuracy"] for r in runs if n in r] for n in names]
        ax.bar(xs, [sum(v) / len(v) if v else 0 for v in vals], width, label=a["label"])
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, s=6, color="black", zorder=3)
    focus = res.get("focus_levels") or []
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"accuracy, levels {'-'.join(focus[:1] + focus[-1:]) if focus else 'all'}")
    ax.set_title("What enters the latent slots at test time (same weights, greedy)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    return True
