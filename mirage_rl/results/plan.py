"""The plan of the comparison: every ``mirage-rl`` subprocess, what it needs first and the file that says it finished."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..recipe import recipe_path
from .arguments import ARMS, LATENT_ARMS, RUNS, ResultsArguments, arm_seeds


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


def eval_extras(args: ResultsArguments, arm: str) -> list[str]:
    """The options of ``arm``'s evaluation beyond the eval recipe: the latent interventions (with the oracle the arm's
    stage 1 was trained towards: its helper variant, ``--oracle_target residual`` for residual targets,
    ``--oracle_compress grid`` for grid targets; k is read from the checkpoint) for :data:`LATENT_ARMS`,
    ``--helper_as_input`` for the input upper bound."""
    helper = args.alt_helper if arm == "mirage_alt_helper" else args.helper
    oracle = ["--oracle_helper", helper] if helper else []
    if arm in LATENT_ARMS and args.interventions:
        return (["--latent_intervention", *args.interventions, *oracle]
                + (["--oracle_target", "residual"] if arm == "mirage_residual" else [])
                + (["--oracle_compress", "grid"] if arm == "mirage_grid" else []))
    if arm == "input_upper_bound":
        return ["--helper_as_input", "true", *oracle]
    return []


def plan(args: ResultsArguments, base: Path | None = None) -> list[Step]:
    """The steps of the comparison (module docstring), in an order that respects their dependencies. ``base``: the
    :func:`base_path` of ``args`` when the caller has it already."""
    root = Path(args.output_root)
    base = base or base_path(args)
    datasets = {"main": ("data/plan", dataset_dir(args.data_config), args.data_config)}
    if args.alt_data_config and any(RUNS[r][2] == "alt_helper" for r in runs_of(args.arms)):
        datasets["alt_helper"] = ("data/alt_helper", dataset_dir(args.alt_data_config), args.alt_data_config)
    steps = [Step(key, ["build-data", "--config", config], [], f"{out}/dataset_dict.json")
             for key, out, config in datasets.values()]
    steps.append(Step("base", ["base-model", "--config", args.base_config], [], f"{base}/base.json"))
    for seed in args.seeds:
        arms = [a for a in args.arms if seed in arm_seeds(args, a)]
        for run in runs_of(arms):
            cmd, parent, data = RUNS[run]
            data_key, data_dir, _ = datasets[data]
            start = base if parent == "base" else root / f"seed{seed}" / parent
            out = root / f"seed{seed}" / run
            steps.append(Step(f"seed{seed}/{run}", [cmd, "--config", recipe(args, run), "--model_name_or_path", str(start),
                                                    "--dataset_path", data_dir, "--output_dir", str(out), "--seed", str(seed)],
                              [data_key, "base" if parent == "base" else f"seed{seed}/{parent}"],
                              f"{out}/model.safetensors"))
        for arm in arms:
            run = ARMS[arm][1]
            model = root / f"seed{seed}" / run
            steps.append(Step(f"seed{seed}/eval_{run}", ["eval", "--config", recipe(args, "eval"), "--model", str(model),
                                                         "--benchmark_dir", args.benchmark_dir,
                                                         "--output_dir", str(model / "eval"), *eval_extras(args, arm)],
                              [f"seed{seed}/{run}"], f"{model}/eval/report.json"))
    return steps
