"""``mirage-rl base-model``: the seeing tiny base, built once from a config and cached (issue 19).

A tiny Qwen2.5-VL built from scratch cannot see: its vision tower means nothing, and neither do Mirage's stage-1
targets taken from it. The base every demo and ``make results`` start from is therefore pretrained on perception
first (the VSP ``describe`` task: image -> the map as a table, vision tower trained), as a released VLM would be.

What it runs (``recipes/vsp_spatial_planning/base_small.yaml`` names the four configs):

1. ``build-data`` of ``data_config`` (the describe task),
2. ``create-model`` of ``model_config`` (the plain from-scratch tiny model),
3. ``sft`` of ``pretrain_config`` (the perception pretraining; resumes from its last checkpoint when interrupted),
4. ``eval --task describe`` of the result on the test maps (``eval_config``'s benchmark and prompt): exact tables,
   cells right, player and goal found, per level,

in ``cache_dir/.NAME-KEY.tmp-build``, then moves the pretrained model to ``cache_dir/NAME-KEY`` (with ``base.json``:
the key, its inputs, the perception figures, the wall time of each step, the text hidden size) and points the alias
``cache_dir/NAME`` (a symbolic link) at it. ``KEY`` hashes everything that changes the base: the four configs' settings
(output paths aside), the bytes of the training and test data they read, and the code that builds data and model
(``mirage_rl.__version__`` and the sources of the data, task and tiny-model modules). A later run with the same key
reuses the cached base in a second; a changed config, data or builder gets a new key and a new base; the old one is
kept. Recipes refer to the alias (``model_name_or_path: outputs/base/seeing-tiny``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .recipe import RecipeError, load_recipe
from .data.jsonl import read_json

logger = logging.getLogger(__name__)

#: the modules whose source defines the base's data and initial model (their bytes enter the key)
BUILDER_SOURCES = ("tiny.py", "data/build.py", "data/messages.py", "data/images.py", "tasks/vsp_planning/maps.py",
                   "tasks/vsp_planning/prompts.py", "tasks/vsp_planning/rows.py")
#: keys of the configs that say where things go, not what is built (left out of the key)
_PATH_KEYS = ("output_dir", "model_name_or_path", "dataset_path", "overwrite_output_dir", "replace_output_dir", "model")


@dataclass
class BaseModelArguments:
    """Arguments of ``mirage-rl base-model`` (``recipes/vsp_spatial_planning/base_small.yaml``)."""

    name: str = field(default="seeing-tiny", metadata={"help": "The alias of the base under cache_dir."})
    cache_dir: str = field(default="outputs/base", metadata={"help": "Where bases are built and kept."})
    data_config: str = field(default="data/vsp_spatial_planning_small_describe.yaml",
                             metadata={"help": "build-data config of the perception task."})
    model_config: str = field(default="recipes/vsp_spatial_planning/model_small.yaml",
                              metadata={"help": "create-model config of the from-scratch model."})
    pretrain_config: str = field(default="recipes/vsp_spatial_planning/pretrain_small.yaml",
                                 metadata={"help": "sft recipe of the perception pretraining."})
    eval_config: str = field(default="recipes/vsp_spatial_planning/eval_small.yaml",
                             metadata={"help": "eval recipe whose benchmark_dir and prompt the perception check uses."})
    eval_levels: list[int] | None = field(default=None, metadata={
        "help": "Levels of the perception check (default: every level of the benchmark)."})
    rebuild: bool = field(default=False, metadata={"help": "Build again even when a base of this key is cached."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Use a cache_dir holding entries no mirage-rl run wrote (they are kept, never deleted)."})

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        for key in ("data_config", "model_config", "pretrain_config", "eval_config"):
            if not Path(getattr(self, key)).is_file():
                raise RecipeError(f"{key}: {getattr(self, key)} does not exist")


def _settings(path: str) -> dict:
    return {k: v for k, v in load_recipe(path).items() if k not in _PATH_KEYS}


def file_digest(path: Path, h) -> None:
    h.update(str(path.name).encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def tree_digest(root: Path, h) -> None:
    """Every file under ``root`` (sorted relative paths and bytes)."""
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        file_digest(p, h)


def base_inputs(args: BaseModelArguments) -> dict:
    """What the key hashes: the configs' settings, the data they read, the builder code (module docstring).

    Raises:
        FileNotFoundError: the training JSONL or the test folder the data config names is missing.
    """
    import mirage_rl

    data = load_recipe(args.data_config)
    h = hashlib.sha256()
    for key in ("train_jsonl", "test_dir"):
        path = Path(data.get(key) or "")
        if not path.exists():
            raise FileNotFoundError(f"{args.data_config}: {key} {path} does not exist (the VSP data of ../shared/data)")
        tree_digest(path, h) if path.is_dir() else file_digest(path, h)
    code = hashlib.sha256(mirage_rl.__version__.encode())
    pkg = Path(mirage_rl.__file__).parent
    for rel in BUILDER_SOURCES:
        file_digest(pkg / rel, code)
    ev = load_recipe(args.eval_config)
    return {"data": _settings(args.data_config), "model": _settings(args.model_config),
            "pretrain": _settings(args.pretrain_config),
            "eval": {"prompt": ev.get("prompt", "test"), "benchmark_dir": str(ev.get("benchmark_dir", "")),
                     "levels": args.eval_levels},
            "data_digest": h.hexdigest(), "code_digest": code.hexdigest(), "version": mirage_rl.__version__}


def base_key(inputs: dict) -> str:
    """The first 12 hex digits of the sha256 of ``inputs`` (canonical JSON)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_dir(args: BaseModelArguments) -> Path:
    """``cache_dir/NAME-KEY``: where the base of these arguments is (or will be) cached."""
    return Path(args.cache_dir) / f"{args.name}-{base_key(base_inputs(args))}"


def _is_built(folder: Path) -> bool:
    return (folder / "base.json").is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _point_alias(cache: Path, name: str, target: str) -> None:
    """``cache/name`` -> ``target`` (a relative symbolic link), replaced atomically. Raises ``FileExistsError`` when
    ``cache/name`` is a real folder or file (never ours to replace)."""
    alias = cache / name
    if alias.exists() and not alias.is_symlink():
        raise FileExistsError(f"{alias} exists and is not the alias link mirage-rl writes; move it away or choose "
                              "another name")
    from .outputs import record

    record(cache, [name], "base")
    tmp = cache / f".{name}.tmp-link"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, alias)


def build_base(args: BaseModelArguments) -> dict:
    """Build (or find) the base of ``args``; returns its ``base.json`` record (module docstring).

    Raises:
        FileNotFoundError: missing configs or data. OutputDirError: ``cache_dir`` holds foreign entries or another
        build runs there. Errors of the steps propagate (build-data, create-model, sft, eval).
    """
    from .outputs import output_dir_guard

    inputs = base_inputs(args)
    key = base_key(inputs)
    cache = Path(args.cache_dir)
    final = cache / f"{args.name}-{key}"
    with output_dir_guard(cache, "base", args.overwrite_output_dir, what="base cache folder"):
        if _is_built(final) and not args.rebuild:
            record = read_json(final / "base.json")
            _point_alias(cache, args.name, final.name)
            logger.info("base-model: %s is cached (key %s); reusing it (built in %.1f min)", final, key,
                        record["wall_s"]["total"] / 60)
            return record
        record = _build(args, inputs, key, cache, final)
        _point_alias(cache, args.name, final.name)
        return record


def _build(args: BaseModelArguments, inputs: dict, key: str, cache: Path, final: Path) -> dict:
    from .atomic import atomic_write_text
    from .commands.create_model import CreateModelArguments, run_create_model
    from .data.build import BuildDataArguments, build_dataset
    from .evaluation import EvalArguments, evaluate
    from .outputs import record as record_entries
    from .pipeline import finished, parse_stage
    from .recipe import parse

    work = cache / f".{args.name}-{key}.tmp-build"  # kept when interrupted: the pretraining resumes from it
    work.mkdir(parents=True, exist_ok=True)
    data, model, pretrained = work / "data", work / "model", work / "pretrained"
    walls, t_all = {}, time.perf_counter()

    def step(name: str, done: bool, run, argv: list[str]) -> None:
        """Run ``run(argv)`` (what ``mirage-rl <argv>`` runs) unless ``done``; its wall time goes to ``walls``."""
        if done:
            logger.info("base-model: %s already done in %s", name, work)
            return
        logger.info("base-model: %s: mirage-rl %s", name, " ".join(argv))
        t0 = time.perf_counter()
        run(argv[1:])
        walls[name] = round(time.perf_counter() - t0, 1)

    def pretrain(argv):
        script, train, model_args, runner, _ = parse_stage("stage2", argv)
        runner(script, train, model_args)

    step("data", (data / "dataset_dict.json").is_file(), lambda a: build_dataset(parse((BuildDataArguments,), a)[0]),
         ["build-data", "--config", args.data_config, "--output_dir", str(data)])
    step("model", finished(model), lambda a: run_create_model(parse((CreateModelArguments,), a)[0]),
         ["create-model", "--config", args.model_config, "--output_dir", str(model)])
    step("pretrain", finished(pretrained), pretrain,
         ["sft", "--config", args.pretrain_config, "--model_name_or_path", str(model), "--dataset_path", str(data),
          "--output_dir", str(pretrained)])
    ev = load_recipe(args.eval_config)
    step("eval_describe", (pretrained / "eval_describe" / "report.json").is_file(),
         lambda a: evaluate(parse((EvalArguments,), a)[0]),
         ["eval", "--task", "describe", "--model", str(pretrained), "--benchmark_dir", str(ev["benchmark_dir"]),
          "--prompt", str(ev.get("prompt", "test")), "--max_new_tokens", "64",
          "--output_dir", str(pretrained / "eval_describe"),
          *(["--levels", *map(str, args.eval_levels)] if args.eval_levels else [])])
    report = read_json(pretrained / "eval_describe" / "report.json")
    walls["total"] = round(time.perf_counter() - t_all, 1)
    config = read_json(pretrained / "config.json")
    record = {"name": args.name, "key": key, "inputs": inputs, "wall_s": walls,
              "perception": {k: report[k] for k in ("n", "table_exact", "cell_accuracy", "player_found", "goal_found")}
              | {"by_level": report["by_level"]},
              "text_hidden_size": config.get("text_config", config).get("hidden_size"),
              "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(pretrained / "base.json", json.dumps(record, indent=2) + "\n")
    record_entries(pretrained, ["base.json", "eval_describe"], "model")
    if final.exists():  # --rebuild: the old copy of this key is ours (same key, same inputs)
        shutil.rmtree(final)
    os.replace(pretrained, final)
    shutil.rmtree(work)  # the describe data and the initial model: ours, rebuilt from the key if ever needed
    logger.info("base-model: built %s in %.1f min; perception on the test maps: %s", final, walls["total"] / 60,
                {lv: round(s["table_exact"], 2) for lv, s in report["by_level"].items()})
    return record
