"""Figure of docs/GRPO_TINY.md: GRPO mean reward per logged step, tiny model, all VSP train maps vs 4 maps.

    python docs/figures/plot_grpo_tiny.py outputs/demo/grpo/train_log.json outputs/demo/grpo_4maps/train_log.json
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

runs = {"all 4,993 train maps (make demo)": sys.argv[1], "4 train maps": sys.argv[2]}
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
for ax, (label, path) in zip(axes, runs.items()):
    rows = [h for h in json.load(open(path)) if "reward" in h]
    steps = [h["step"] for h in rows]
    ax.plot(steps, [h["reward"] for h in rows], lw=2, label="reward (1.0 success + 0.1 format)")
    ax.plot(steps, [h["rewards/plan_success_reward/mean"] for h in rows], lw=1, label="plan_success_reward")
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("GRPO step (16 rollouts = 2 maps x 8)")
axes[0].set_ylabel("mean over the logged 5 steps")
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig("docs/figures/grpo_tiny_reward.png", dpi=110)
