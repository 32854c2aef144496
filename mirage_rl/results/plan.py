"""The plan of the comparison: every ``mirage-rl`` subprocess, what it needs first and the file that says it finished."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..recipe import recipe_path
from .arguments import ARMS, RUNS, ResultsArguments


@dataclass
class Step:
    """One subprocess of the plan: ``key`` (``seed0/stage1``), its argv after ``python -m mirage_rl``, the keys it
    needs first and the file whose existence means it finished."""

    key: str
    argv: list[str]
    needs: list[str]
    done_file: str


def recipe(args: ResultsArguments, name: str) -> str:
    """The recipe of run ``name`` of this comparison: ``{recipe_dir}/{name}_{variant}.yaml``
    (:func:`mirage_rl.recipe.recipe_path`, whose ``FileNotFoundError`` names it and the variants that exist)."""
    return str(recipe_path(args.recipe_dir, name, args.variant))


def dataset_dir(config: str) -> str:
    """The ``output_dir`` of a build-data config."""
    from ..recipe import load_recipe

    out = load_recipe(config).get("output_dir")
    if not out:
        raise ValueError(f"{config}: no output_dir")
    return out


def chain(run: str) -> list[str]:
    """The runs that lead to ``run`` from the base model, first to last (``run`` included)."""
    out = []
    while run != "base":
        out.append(run)
        run = RUNS[run][1]
    return out[::-1]


def runs_of(arms: list[str]) -> list[str]:
    """Every run the arms need, in dependency order."""
    need = {r for arm in arms for r in chain(ARMS[arm][1])}
    return [r for r in RUNS if r in need]


def base_path(args: ResultsArguments) -> Path:
    """The cached base of ``args.base_config`` (``mirage_rl.base_model.base_dir``: ``cache_dir/NAME-KEY``)."""
    from ..base_model import BaseModelArguments, base_dir
    from ..recipe import parse

    (base_args,) = parse((BaseModelArguments,), ["--config", args.base_config])
    return base_dir(base_args)


def plan(args: ResultsArguments, base: Path | None = None) -> list[Step]:
    """The steps of the comparison (module docstring), in an order that respects their dependencies. ``base``: the
    :func:`base_path` of ``args`` when the caller has it already."""
    root = Path(args.output_root)
    data, base = dataset_dir(args.data_config), base or base_path(args)
    steps = [
        Step("data/plan", ["build-data", "--config", args.data_config], [], f"{data}/dataset_dict.json"),
        Step("base", ["base-model", "--config", args.base_config], [], f"{base}/base.json"),
    ]
    for seed in args.seeds:
        for run in runs_of(args.arms):
            cmd, parent = RUNS[run]
            start = base if parent == "base" else root / f"seed{seed}" / parent
            out = root / f"seed{seed}" / run
            steps.append(Step(f"seed{seed}/{run}", [cmd, "--config", recipe(args, run), "--model_name_or_path", str(start),
                                                    "--dataset_path", data, "--output_dir", str(out), "--seed", str(seed)],
                              ["data/plan", "base" if parent == "base" else f"seed{seed}/{parent}"],
                              f"{out}/model.safetensors"))
        for arm in args.arms:
            run = ARMS[arm][1]
            model = root / f"seed{seed}" / run
            steps.append(Step(f"seed{seed}/eval_{run}", ["eval", "--config", recipe(args, "eval"), "--model", str(model),
                                                         "--benchmark_dir", args.benchmark_dir,
                                                         "--output_dir", str(model / "eval")],
                              [f"seed{seed}/{run}"], f"{model}/eval/report.json"))
    return steps
