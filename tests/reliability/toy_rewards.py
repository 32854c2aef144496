"""A reward plugin for the fault tests: it varies inside every group even for an untrained model, so that GRPO
steps change the weights (a resume that lost them would show in the loss curve)."""


def length_reward(completions, **kwargs):
    """Fraction of the 48-character budget the completion's text uses (a float in [0, 1])."""
    return [min(len(c if isinstance(c, str) else c[-1]["content"]), 48) / 48 for c in completions]


# Plugins that break TRL's reward contract (tests/reliability/test_round3.py, class 4)
def string_reward(completions, **kwargs):
    """Returns strings instead of floats."""
    return ["good" for _ in completions]


def one_value_reward(completions, **kwargs):
    """Returns one value for the whole batch."""
    return [1.0]


def raising_reward(completions, **kwargs):
    """Raises inside the plugin."""
    table = {}
    return [table[len(c)] for c in completions]
