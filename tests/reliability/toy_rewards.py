"""A reward plugin for the fault tests: it varies inside every group even for an untrained model, so that GRPO
steps change the weights (a resume that lost them would show in the loss curve)."""


def length_reward(completions, **kwargs):
    """Fraction of the 48-character budget the completion's text uses (a float in [0, 1])."""
    return [min(len(c if isinstance(c, str) else c[-1]["content"]), 48) / 48 for c in completions]
