"""Recipe files: every key checked against the argument dataclasses before ``trl.TrlParser`` reads them.

``TrlParser`` rejects an unknown key with a generic message and lets a wrong type through to a failure deep in
training (``latent_size: [4]`` crashes in a comparison). :func:`check_recipe` names the file, the key, what is
wrong (with the closest known key for a typo) and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path

from .errors import UserError

_BOOL_STRINGS = {"true", "false", "yes", "no", "1", "0"}


#: the program name option errors and ``--help`` show (``mirage-rl eval``; set by :func:`mirage_rl.cli.main`)
PROG: str | None = None


class RecipeError(UserError, ValueError):
    """A recipe file or command-line option that cannot be used; the message names the file or option and key."""


def _unique_key_loader():
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise RecipeError(f"{key_node.start_mark.line + 1}: duplicate key {key!r} (first on line "
                                      f"{seen[key] + 1}); keep one of them")
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


#: The runs a recipe folder may hold a recipe for; a recipe is named ``<stage>_<variant>.yaml`` (``stage1_tiny.yaml``,
#: ``grpo_qwen2.5_vl_7b.yaml``, ``results_small.yaml``): the run first, then the model or experiment variant.
RECIPE_STAGES = ("stage1", "stage2", "grpo", "eval", "direct_sft", "direct_sft_grpo", "dummy_latent", "model",
                 "pretrain", "base", "results", "direct_sft_matched", "grpo_strict", "direct_sft_grpo_strict",
                 "input_upper_bound", "stage1_residual", "stage2_residual", "stage1_alt_helper", "stage2_alt_helper")


def recipe_path(recipe_dir: str | Path, stage: str, variant: str) -> Path:
    """``{recipe_dir}/{stage}_{variant}.yaml``, the one naming rule of recipes (:data:`RECIPE_STAGES`).

    Raises:
        FileNotFoundError: the file is missing; the message lists the variants of ``stage`` the folder has.
    """
    path = Path(recipe_dir) / f"{stage}_{variant}.yaml"
    if not path.is_file():
        longer = [s for s in RECIPE_STAGES if s.startswith(stage + "_")]  # direct_sft_* is not direct_sft_grpo_*
        have = sorted(p.stem[len(stage) + 1:] for p in Path(recipe_dir).glob(f"{stage}_*.yaml")
                      if not any(p.stem.startswith(s + "_") for s in longer))
        raise FileNotFoundError(f"{path}: no {stage} recipe for variant {variant!r} (variants in {recipe_dir}: "
                                f"{have or 'none'}; recipes are named <stage>_<variant>.yaml)")
    return path


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe into a dict.

    Raises:
        RecipeError: no such file, a folder, a YAML syntax error or a key given twice (with its line), or a top level
            that is not a mapping.
    """
    import yaml

    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"--config {p} is a folder, not a recipe file: pass one YAML file, e.g. "
                          f"{p / 'stage1_tiny.yaml'}")
    if not p.is_file():
        raise RecipeError(f"recipe {p} does not exist")
    try:
        loader = _unique_key_loader()(p.read_text(encoding="utf-8"))  # a SafeLoader: no Python objects are built
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecipeError as e:  # a duplicate key: "LINE: ..."
        raise RecipeError(f"{p}:{e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of key: value lines, got a {type(data).__name__}")
    return data


def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation in a third-party dataclass: check names only
        return {}


def _accepts(value, tp) -> bool:
    """Whether ``value`` (as YAML gives it) can fill a field annotated ``tp`` (HfArgumentParser's conversions)."""
    if tp is typing.Any or tp is None:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_accepts(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, (dict, str))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in tp.__members__
    if tp is bool:
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_STRINGS)
    if tp is int:
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return True
        return isinstance(value, str) and value.strip().lstrip("+-").isdigit()
    if tp is float:
        if isinstance(value, bool):
            return False
        if isinstance(value, (int, float)):
            return True
        try:
            float(value)
            return isinstance(value, str)
        except (TypeError, ValueError):
            return False
    if tp is str:
        return isinstance(value, str)
    return True


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def check_recipe(path: str | Path, dataclass_types) -> dict:
    """Check every key of the recipe at ``path`` against the fields of ``dataclass_types``; returns the recipe.

    Raises:
        RecipeError: a key no dataclass has (with the closest known keys), or a value of the wrong type (with the
            expected type); naming the file.
    """
    data = load_recipe(path)
    fields: dict[str, object] = {}
    for cls in dataclass_types:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                fields.setdefault(f.name, hints.get(f.name))
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.7)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise RecipeError(f"{path}: unknown key {key!r}; {hint}(valid keys are the fields of "
                              f"{', '.join(c.__name__ for c in dataclass_types)}; remove it or fix its spelling)")
        tp = fields[key]
        if tp is not None and not _accepts(value, tp):
            raise RecipeError(f"{path}: key {key!r} must be {_type_name(tp)}, got {value!r} "
                              f"({type(value).__name__})")
    return data


def parse(dataclass_types, argv: list[str]):
    """``TrlParser(dataclass_types).parse_args_and_config(argv)`` after :func:`check_recipe` on ``--config``.

    Raises:
        RecipeError: a bad recipe (:func:`check_recipe`), a bad command-line option (``argument --learning_rate:
            invalid float value: 'fast'``, instead of argparse's usage screen and exit), or a value a config's
            ``__post_init__`` refuses (``num_train_epochs=0 ...``), with that message.
    """
    import argparse

    from trl import TrlParser

    class Formatter(argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # a help text that states its default already gets no second one
            text = action.help or ""
            return text if "default" in text.lower() else super()._get_help_string(action)

    class Parser(TrlParser):
        def error(self, message):  # argparse would print the whole usage and exit
            raise RecipeError(f"{message} (--help lists the options)")

    parser = Parser(dataclass_types, prog=PROG, formatter_class=Formatter)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="RECIPE.yaml",
                        help="A recipe (YAML) whose keys set these options; options given here override it.")
    options = {}
    for action in parser._actions:
        for opt in action.option_strings:
            options[opt] = action
    for opt, action in options.items():  # HfArgumentParser gives --no_X the help of --X
        if opt.startswith("--no_") and f"--{opt[5:]}" in options and action.help == options[f"--{opt[5:]}"].help:
            action.help = f"Turn --{opt[5:]} off."
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a file path")
        check_recipe(argv[i + 1], dataclass_types)
    try:
        return parser.parse_args_and_config(args=argv)
    except RecipeError:
        raise
    except ValueError as e:  # a __post_init__ check of one of the argument dataclasses (ours, TRL's, transformers')
        if "Some specified arguments are not used" in str(e):
            raise RecipeError(_unknown_options(e, argv, [o for o in options if "-" not in o[2:]])) from None
        raise RecipeError(str(e)) from e


def _unknown_options(e: ValueError, argv: list[str], known: list[str]) -> str:
    """``unknown option --max_stepz (did you mean --max_steps?)``: HfArgumentParser's leftover arguments, each
    option with its closest known options (the treatment recipe keys get)."""
    text = str(e)
    left = text[text.find("["):] if "[" in text else ""
    unknown = [a for a in argv if a.startswith("--") and a.split("=")[0] not in known and a.split("=")[0] in left]
    see = f"`{PROG or 'mirage-rl COMMAND'} --help` lists the options"
    if not unknown:  # values without an option (an unquoted glob, a value given twice)
        return f"unexpected arguments {left}: every value follows its --option; {see}"
    parts = []
    for opt in unknown:
        close = difflib.get_close_matches(opt.split("=")[0], known, n=2, cutoff=0.7)
        parts.append(f"{opt}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return f"unknown option {', '.join(parts)}; {see}"
