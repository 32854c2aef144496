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

Every loaded function is wrapped by :func:`checked_reward`, which holds it to TRL's contract at every call: an
exception inside the plugin, or a return value that is not one number (or ``None``) per completion, becomes one line
(:class:`RewardContractError`) naming the plugin, the batch, and what was expected against what came back.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

from mirage_rl.errors import UserError

from .accuracy import choice_accuracy_reward, plan_success_reward
from .format import format_reward

REWARD_FUNCS: dict[str, Callable] = {
    "plan_success_reward": plan_success_reward,
    "choice_accuracy_reward": choice_accuracy_reward,
    "format_reward": format_reward,
}

__all__ = ["REWARD_FUNCS", "RewardContractError", "check_reward_signature", "checked_reward", "choice_accuracy_reward", "format_reward", "load_reward_funcs",
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
        funcs.append(checked_reward(name, fn))
    return funcs


class RewardContractError(UserError, ValueError):
    """A reward function broke TRL's contract (raised, or returned something other than one number or ``None`` per
    completion); the message names the plugin, the batch and what came back."""


def _plugin_frame(exc: BaseException, fn: Callable) -> str:
    """``file:line in func: source`` of the innermost traceback frame in the plugin's own file (else the innermost
    frame outside this module): where the plugin failed, not TRL's call."""
    import linecache

    try:
        own = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:
        own = None
    frames, tb = [], exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename != __file__:
            frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    pick = next((f for f in reversed(frames) if own and f[0].f_code.co_filename == own), frames[-1] if frames else None)
    if pick is None:
        return "?"
    frame, line = pick
    src = linecache.getline(frame.f_code.co_filename, line).strip()
    return f"{frame.f_code.co_filename}:{line} in {frame.f_code.co_name}" + (f": {src}" if src else "")


def _shown(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_rewards(name: str, out, n: int, batch: str) -> list:
    """``out`` as a list of ``n`` floats or ``None``; raises :class:`RewardContractError` otherwise."""
    import math
    import numbers

    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or isinstance(out, dict):
        raise RewardContractError(f"reward function {name} ({batch}): expected a list of {n} floats (or None), one "
                                  f"per completion; got a {type(out).__name__}: {_shown(out)}")
    out = list(out)
    if len(out) != n:
        raise RewardContractError(f"reward function {name} ({batch}): expected {n} rewards, one per completion; got "
                                  f"{len(out)}: {_shown(out)}")
    for i, r in enumerate(out):
        if r is None:
            continue
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise RewardContractError(f"reward function {name} ({batch}): expected a float (or None) per completion; "
                                      f"completion {i} got a {type(r).__name__}: {_shown(r)}")
        if math.isinf(float(r)):
            raise RewardContractError(f"reward function {name} ({batch}): completion {i} got {r}; a reward must be "
                                      "finite (None marks a completion the reward does not apply to)")
    return [None if r is None else float(r) for r in out]


def checked_reward(name: str, fn: Callable) -> Callable:
    """``fn`` held to TRL's reward contract at every call (module docstring); keeps ``fn``'s ``__name__`` (TRL's
    metric name). An ``async`` plugin stays ``async``.

    Raises (at call time):
        RewardContractError: the plugin raised (naming its own frame: file, line, source) or returned something
            other than one float or ``None`` per completion.
    """

    def batch_of(args, kwargs) -> tuple[int, str]:
        completions = kwargs.get("completions", args[0] if args else None)
        n = len(completions) if completions is not None else 0
        step = getattr(kwargs.get("trainer_state"), "global_step", None)
        return n, (f"step {step}, " if step is not None else "") + f"a batch of {n} completions"

    def failed(e: Exception, batch: str) -> RewardContractError:
        return RewardContractError(f"reward function {name} ({batch}) raised {type(e).__name__}: {e} at "
                                   f"{_plugin_frame(e, fn)} (--debug shows the whole traceback)")

    if inspect.iscoroutinefunction(inspect.unwrap(fn)):
        @functools.wraps(fn)
        async def call_async(*args, **kwargs):
            n, batch = batch_of(args, kwargs)
            try:
                out = await fn(*args, **kwargs)
            except Exception as e:
                raise failed(e, batch) from e
            return _check_rewards(name, out, n, batch)

        return call_async

    @functools.wraps(fn)
    def call(*args, **kwargs):
        n, batch = batch_of(args, kwargs)
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            raise failed(e, batch) from e
        return _check_rewards(name, out, n, batch)

    return call
