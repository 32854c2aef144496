"""``mirage-rl pipeline``: stage 1 -> stage 2 -> GRPO -> evaluation from one recipe folder.

The folder holds one recipe per stage and model variant, ``{stage}_{variant}.yaml`` (``stage1_tiny.yaml``,
``grpo_qwen2.5_vl_7b.yaml``, ...) and the evaluation settings ``eval_{variant}.yaml``. Each stage starts from the
previous stage's output (its ``model_name_or_path`` is overridden); stage 1 starts from its recipe's model. After
each stage the checkpoint is evaluated and ``pipeline_summary.md`` / ``.json`` (one row per stage) are rewritten.
A stage whose output folder already holds a finished model trained with the same settings (start model and its
weights, dataset, max_steps, seed, ...: ``run`` in its ``mirage_output.json``) is not retrained (logged), so an
interrupted pipeline resumes where it stopped; a finished model of other settings is refused, naming the settings
that differ (``--retrain true`` retrains it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_text, recover_directory
from .outputs import output_dir_guard
from .recipe import parse, recipe_path
from .tables import markdown_table
from .data.jsonl import read_json

logger = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "grpo")


@dataclass
class PipelineArguments:
    """Arguments of ``mirage-rl pipeline``."""

    recipe_dir: str = field(default="recipes/vsp_spatial_planning", metadata={"help": "Folder of the stage recipes."})
    variant: str = field(default="tiny", metadata={"help": "Recipe suffix: tiny, qwen2.5_vl_7b, ..."})
    stages: list[str] = field(default_factory=lambda: list(STAGES), metadata={"help": f"A sub-sequence of {STAGES}."})
    output_root: str | None = field(default=None, metadata={
        "help": "Put stage S in OUTPUT_ROOT/S (default: each recipe's output_dir) and the summary in OUTPUT_ROOT."})
    evaluate: bool = field(default=True, metadata={"help": "Evaluate after each stage."})
    retrain: bool = field(default=False, metadata={"help": "Retrain stages whose output already holds a model."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into output folders holding entries no mirage-rl run wrote (they are kept, never deleted)."})


def finished(output_dir: str | Path) -> bool:
    """True when ``output_dir`` holds a saved model (written atomically by ``save_pretrained``)."""
    recover_directory(output_dir)
    out = Path(output_dir)
    return (out / "config.json").exists() and any(out.glob("model*.safetensors"))


def parse_stage(stage: str, argv: list[str]):
    """``(script_args, training_args, model_args, runner, command)`` of one stage's recipe + overrides.

    Raises:
        ValueError: an SFT recipe whose ``stage`` differs from the pipeline stage.
    """
    from trl import ModelConfig

    if stage == "grpo":
        from .commands.grpo import GRPOScriptArguments, run_grpo
        from .trainers import MirageGRPOConfig

        script, train, model = parse((GRPOScriptArguments, MirageGRPOConfig, ModelConfig), argv)
        return script, train, model, run_grpo, "grpo"
    from .commands.sft import SFTScriptArguments, run_sft
    from .trainers import MirageSFTConfig

    script, train, model = parse((SFTScriptArguments, MirageSFTConfig, ModelConfig), argv)
    if train.stage != int(stage[-1]):
        raise ValueError(f"{argv[1]}: recipe says stage: {train.stage}, the pipeline runs it as {stage}")
    return script, train, model, run_sft, "sft"


def run_stage(stage: str, argv: list[str], retrain: bool = False) -> str:
    """Parse and run one stage, unless its output already holds a finished model trained with the same settings
    (and not ``retrain``); returns its output folder.

    Raises:
        ValueError: an SFT recipe's ``stage`` differs from the pipeline stage; or the output holds a finished model
            trained with other settings (naming them) and not ``retrain``.
    """
    from .atomic import read_manifest
    from .commands.common import run_settings
    from .outputs import settings_differences

    script, train, model, runner, command = parse_stage(stage, argv)
    if finished(train.output_dir) and not retrain:
        diff = settings_differences(read_manifest(train.output_dir).get("run"),
                                    run_settings(command, script, train, model))
        if diff:
            raise ValueError(f"{stage}: {train.output_dir} holds a finished model trained with other settings "
                             f"({'; '.join(diff)}); pass --retrain true to train it again (the files of the old model "
                             "are replaced, everything else in the folder is kept), or use another --output_root")
        logger.info("%s: %s already holds a finished model of these settings; not retraining it (pass "
                    "--retrain true to retrain)", stage, train.output_dir)
    else:
        train.replace_output_dir = train.replace_output_dir or retrain
        runner(script, train, model)
    return train.output_dir


def run_pipeline(args: PipelineArguments) -> list[dict]:
    """Run the stages in order, evaluating after each; returns the summary rows.

    Raises:
        ValueError: unknown or out-of-order stages. FileNotFoundError: a missing recipe (listing the variants).
    """
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or list(args.stages) != [s for s in STAGES if s in args.stages]:
        raise ValueError(f"stages must be an ordered sub-sequence of {list(STAGES)}, got {args.stages}")
    paths = {s: recipe_path(args.recipe_dir, s, args.variant) for s in args.stages}
    eval_path = recipe_path(args.recipe_dir, "eval", args.variant) if args.evaluate else None
    root = Path(args.output_root) if args.output_root else None
    # every recipe is parsed (and every option checked) before the first stage trains
    first = parse_stage(args.stages[0], ["--config", str(paths[args.stages[0]])]
                        + (["--output_dir", str(root / args.stages[0])] if root else []))[1].output_dir
    for stage in args.stages[1:]:
        parse_stage(stage, ["--config", str(paths[stage])])
    summary_root = root or Path(first).parent
    with output_dir_guard(summary_root, "pipeline", args.overwrite_output_dir, what="pipeline summary folder"):
        return _run_stages(args, paths, eval_path, root, summary_root)


def _run_stages(args: PipelineArguments, paths: dict, eval_path: Path | None, root: Path | None,
                summary_root: Path) -> list[dict]:
    from accelerate import PartialState

    state = PartialState()
    rows: list[dict] = []
    bars: dict | None = None
    prev: str | None = None
    for stage in args.stages:
        argv = ["--config", str(paths[stage])]
        if prev is not None:
            argv += ["--model_name_or_path", prev]
        if root is not None:
            argv += ["--output_dir", str(root / stage)]
        if args.overwrite_output_dir:
            argv += ["--overwrite_output_dir", "true"]
        logger.info("pipeline: %s from %s", stage, paths[stage])
        prev = run_stage(stage, argv, retrain=args.retrain)
        state.wait_for_everyone()
        if eval_path is not None:
            if state.is_main_process:
                if bars is None and not rows:
                    bars = chance_bars(parse_stage(stage, argv)[0].dataset_path, eval_settings(eval_path))
                rows.append(evaluate_stage(stage, prev, eval_path))
                if stage == "grpo":
                    rows[-1]["reward_trend"] = reward_trend(prev)
                write_summary(rows, summary_root, bars)
            state.wait_for_everyone()
    return rows


def eval_settings(eval_recipe: Path):
    """The ``EvalArguments`` of an evaluation recipe (its task, benchmark and items; the model is set per stage)."""
    from .evaluation import EvalArguments

    (eval_args,) = parse((EvalArguments,), ["--config", str(eval_recipe), "--model", "-"])
    return eval_args


def evaluate_stage(stage: str, model_dir: str, eval_recipe: Path) -> dict:
    """Evaluate one stage's model with the recipe's settings; the summary row: the task's metrics (``Task.metrics``),
    the first of them per level."""
    from .evaluation import EvalArguments, evaluate, format_table
    from .tasks import get_task

    out = Path(model_dir) / "eval"
    # the stage folder's eval/ is the pipeline's own: this evaluation of the stage's model replaces an earlier one
    (eval_args,) = parse((EvalArguments,), ["--config", str(eval_recipe), "--model", model_dir,
                                             "--output_dir", str(out), "--replace_output_dir", "true"])
    report = evaluate(eval_args)
    print(f"\n== {stage}: {model_dir}\n{format_table(report)}")
    keys = [k for k, _ in get_task(report["task"]).metrics]
    return {"stage": stage, "model": model_dir, "task": report["task"], "latent_mode": report["latent_mode"],
            "n": report["n"], **{k: report[k] for k in keys},
            "by_level": {lv: s[keys[0]] for lv, s in report["by_level"].items()},
            "n_by_level": {lv: s["n"] for lv, s in report["by_level"].items()},
            "report": str(out / "report.json")}


def reward_trend(model_dir: str) -> dict | None:
    """The GRPO stage's mean ``reward`` over the first and the last quarter of its logged steps (``train_log.json``);
    ``None`` when it logged fewer than 4 rewards."""
    path = Path(model_dir) / "train_log.json"
    rewards = [e["reward"] for e in read_json(path) if "reward" in e] if path.is_file() else []
    if len(rewards) < 4:
        return None
    q = len(rewards) // 4
    return {"logs": len(rewards), "first_quarter": sum(rewards[:q]) / q, "last_quarter": sum(rewards[-q:]) / q}


def chance_bars(dataset_path: str, eval_args) -> dict | None:
    """The bars a stage's headline metric (the task's first, e.g. ``accuracy``) must clear: every baseline of the
    task's ``chance_baselines`` (from the training split: *random plan* and *best blind plan* for ``plan``,
    *uniform* and *majority class* for the choice tasks): ``{"task", "metric", "baselines": [...], "by_level":
    {level: {baseline: rate}}, "trained_levels": [...]}``, or ``None`` (logged) when the task has no chance levels
    or the training set lacks the columns they are computed from."""
    from .data.disk import load_dataset_folder
    from .tasks import get_task

    task = get_task(eval_args.task)
    metric = task.metrics[0][0]
    try:
        chance = task.chance_baselines(dataset_path, eval_args.benchmark_dir, eval_args.levels, eval_args.items_file)
    except (NotImplementedError, KeyError, ValueError) as e:
        logger.warning("pipeline: no chance bars in the summary: %s (%s: %s)", dataset_path, type(e).__name__, e)
        return None
    ds = load_dataset_folder(dataset_path)
    ds = ds["train"] if hasattr(ds, "keys") else ds
    baselines = [b for b, v in next(iter(chance.values())).items() if isinstance(v, dict) and metric in v]
    trained = sorted({str(x) for x in ds.unique("level")}, key=int) if "level" in ds.column_names else []
    return {"task": task.name, "metric": metric, "baselines": baselines,
            "by_level": {lv: {b: c[b][metric] for b in baselines} for lv, c in chance.items()},
            "trained_levels": trained}


def _weighted(values: dict, n: dict, levels) -> float:
    """``values`` (one rate per level) over ``levels``, weighted by the items per level ``n``
    (:func:`mirage_rl.results.stats.focus_rate`)."""
    from .results.stats import focus_rate

    return focus_rate({lv: {"rate": v, "n": n[lv]} for lv, v in values.items() if lv in n}, "rate", levels)


def _metrics(rows: list[dict]) -> list[tuple[str, str]]:
    from .tasks import get_task

    return list(get_task(rows[0].get("task", "plan")).metrics) if rows else []


def format_summary(rows: list[dict], bars: dict | None = None) -> str:
    """Markdown table: one row per stage, the task's first metric per level, on the trained levels (when ``bars`` are
    given and span several levels), then every metric of the task overall; then one row per chance baseline of
    ``bars`` (:func:`chance_bars`)."""
    metrics = _metrics(rows)
    levels = sorted({lv for r in rows for lv in r["by_level"]}, key=int)
    trained = [lv for lv in (bars or {}).get("trained_levels", []) if lv in levels]
    # one trained level: its column says it; every level trained: the "all" column says it
    span = f"levels {trained[0]}-{trained[-1]}" if 1 < len(trained) < len(levels) else None
    table = []
    for r in rows:
        n = r.get("n_by_level", {})
        table.append([r["stage"], r["latent_mode"], *(r["by_level"].get(lv, float("nan")) for lv in levels),
                      *([_weighted(r["by_level"], n, trained)] if span else []), *(r[k] for k, _ in metrics)])
    if bars and rows:
        n = rows[-1].get("n_by_level", {})
        for key in bars.get("baselines", ()):
            per = {lv: bars["by_level"][lv][key] for lv in levels if lv in bars["by_level"]}
            table.append([f"*chance: {key.replace('_', ' ')}*", "-", *(per.get(lv, float("nan")) for lv in levels),
                          *([_weighted(per, n, trained)] if span else []), _weighted(per, n, levels),
                          *([None] * (len(metrics) - 1))])
    header = ["stage", "latent mode", *(f"level {lv}" for lv in levels), *([span] if span else []), "all",
              *(f"all: {label}" for _, label in metrics[1:])]
    return markdown_table(header, table) + "\n"


_CHANCE_NOTES = {
    "random_plan": "*random plan* = a plan drawn from the training answers of the map's level",
    "best_blind_plan": "*best blind plan* = the one training plan that succeeds on most training maps of the level "
                       "(the best a model that ignores the image could learn)",
    "uniform": "*uniform* = a letter drawn uniformly from the choices",
    "majority_class": "*majority class* = the most frequent answer of the level's training rows",
}


def write_summary(rows: list[dict], root: str | os.PathLike, bars: dict | None = None) -> None:
    from .tasks import get_task

    root = Path(root)
    atomic_write_text(root / "pipeline_summary.json", json.dumps({"stages": rows, "chance": bars}, indent=2) + "\n")
    task = rows[0].get("task", "plan") if rows else "plan"
    note = ("Accuracy = official VSP rule; strict = Mirage rule." if task == "plan" else
            f"Metrics of task {task}: {', '.join(label for _, label in get_task(task).metrics)}.")
    if bars:
        note += (" The chance rows are the bars to clear, computed from the training set only: "
                 + "; ".join(_CHANCE_NOTES.get(b, b) for b in bars.get("baselines", ())) + ".")
    trends = [f"{r['stage']} mean reward, first quarter of its {t['logs']} logged steps -> last quarter: "
              f"{t['first_quarter']:.3f} -> {t['last_quarter']:.3f}\n" for r in rows if (t := r.get("reward_trend"))]
    text = format_summary(rows, bars) + ("\n" + "".join(trends) if trends else "")
    atomic_write_text(root / "pipeline_summary.md", f"# Evaluation after each stage ({task})\n\n" + note + "\n\n"
                      + text)
    print("\n" + text)
