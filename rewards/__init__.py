"""Reward-function plugins for ``MirageGRPOTrainer`` (TRL's reward contract).

A reward function is called as ``fn(prompts=..., completions=..., completion_ids=..., **dataset_columns,
trainer_state=..., log_extra=..., log_metric=...)`` and returns one float (or ``None``: not applicable) per
completion (TRL ``GRPOTrainer``). A recipe names its rewards::

    reward_funcs: [plan_success_reward, format_reward]
    reward_weights: [1.0, 0.1]
    reward_kwargs: {plan_success_reward: {rule: strict}}

A name is a shipped plugin (``REWARD_FUNCS``) or a dotted path to your own function
(``my_package.my_rewards.my_reward`` or ``my_package.my_rewards:my_reward``). Rewards never evaluate
model output as code.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

from .accuracy import choice_accuracy_reward, plan_success_reward
from .format import format_reward

REWARD_FUNCS: dict[str, Callable] = {
    "plan_success_reward": plan_success_reward,
    "choice_accuracy_reward": choice_accuracy_reward,
    "format_reward": format_reward,
}

__all__ = ["REWARD_FUNCS", "check_reward_signature", "choice_accuracy_reward", "format_reward", "load_reward_funcs",
           "plan_success_reward", "resolve_reward"]


def resolve_reward(name: str) -> Callable:
    """The function named ``name``: a shipped plugin or a dotted import path.

    Raises:
        ValueError: an unknown name, listing the shipped plugins; or a path that does not lead to a callable.
    """
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    known = ", ".join(sorted(REWARD_FUNCS))
    if "." not in name and ":" not in name:
        raise ValueError(f"unknown reward function {name!r}: known rewards are {known}, or give a dotted path "
                         "to your own function (package.module.function)")
    module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {name!r}: cannot import module {module_name!r} ({e}); known rewards "
                         f"are {known}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {name!r}: {module_name!r} has no callable {attr!r}; known rewards are {known}")
    return fn


def check_reward_signature(name: str, fn: Callable) -> None:
    """Refuse, at start-up, a callable that cannot be a reward function: TRL calls it as
    ``fn(prompts=..., completions=..., completion_ids=..., **dataset_columns, trainer_state=..., log_extra=...,
    log_metric=...)``, so it needs a ``completions`` parameter and ``**kwargs`` (``os.system`` would otherwise fail
    only after the first rollout).

    Raises:
        ValueError: naming the reward, its signature and the contract.
    """
    contract = ("a reward function is fn(completions, **kwargs) -> list[float | None], one value per completion "
                "(TRL's contract)")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise ValueError(f"reward function {name!r}: {fn!r} has no Python signature to check; {contract}") from None
    named = {p: v for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)}
    has_kwargs = any(v.kind == v.VAR_KEYWORD for v in params.values())
    if "completions" not in named or not has_kwargs:
        raise ValueError(f"reward function {name!r}: signature {name.rsplit('.', 1)[-1]}{inspect.signature(fn)} does "
                         f"not take completions and **kwargs; {contract}")


def load_reward_funcs(names: list[str], reward_kwargs: dict | None = None) -> list[Callable]:
    """Resolve ``names`` and bind each one's keyword arguments from ``reward_kwargs`` (``{name: {key: value}}``).

    The returned callables keep the plugin's ``__name__`` (TRL logs each reward as ``rewards/<name>/mean``).
    Raises:
        ValueError: an empty list, a duplicate or unknown name, a callable that is not ``fn(completions, **kwargs)``
            (:func:`check_reward_signature`), ``reward_kwargs`` for a reward not in ``names``, or an option the
            function does not name in its signature (a typo is not swallowed by ``**kwargs``).
    """
    if not names:
        raise ValueError(f"reward_funcs is empty: name at least one of {', '.join(sorted(REWARD_FUNCS))}")
    if len(set(names)) != len(names):
        raise ValueError(f"reward_funcs lists a reward twice: {names}")
    resolved = [resolve_reward(name) for name in names]  # unknown names first: the error lists the known ones
    for name, fn in zip(names, resolved):
        check_reward_signature(name, fn)
    reward_kwargs = dict(reward_kwargs or {})
    extra = set(reward_kwargs) - set(names)
    if extra:
        raise ValueError(f"reward_kwargs has entries for {sorted(extra)}, which are not in reward_funcs {names}")
    funcs = []
    for name, fn in zip(names, resolved):
        kwargs = reward_kwargs.get(name) or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"reward_kwargs[{name!r}] must be a mapping of keyword arguments, got {kwargs!r}")
        params = inspect.signature(fn).parameters
        named = [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in named or k in ("completions", "prompts", "completion_ids")]
        if unknown:
            raise ValueError(f"reward_kwargs[{name!r}]: {unknown} are not options of {name} "
                             f"(its options: {[p for p in named if p not in ('completions', 'prompts', 'completion_ids')]})")
        if kwargs:
            bound = functools.partial(fn, **kwargs)
            fn = functools.update_wrapper(lambda *a, _f=bound, **k: _f(*a, **k), fn)
        funcs.append(fn)
    return funcs
