"""`mirage-rl base-model`: the seeing tiny base built once from its configs, cached by key, reused, rebuilt when a
config changes (issue 19). Tiny settings: a 2-step pretraining of a 32-wide model on a few maps."""

import json
from pathlib import Path

import pytest
import yaml

from mirage_rl.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes/vsp_spatial_planning"


@pytest.fixture()
def base_config(tmp_path, vsp_dir):
    """The shipped base config with every step shrunk: 24 Mirage maps + 8 generated, a 32-wide model, 2 steps."""
    data = yaml.safe_load((REPO / "data/vsp_spatial_planning_small_describe.yaml").read_text())
    data.update(train_jsonl=str(vsp_dir / "mirage_train_maps.jsonl"), test_dir=str(vsp_dir / "maze_planning"),
                max_train_maps=24, num_generated=8)
    model = yaml.safe_load((RECIPES / "model_small.yaml").read_text()) | {"hidden_size": 32, "num_layers": 1}
    pretrain = yaml.safe_load((RECIPES / "pretrain_small.yaml").read_text())
    pretrain.update(max_steps=2, save_strategy="no", per_device_train_batch_size=4, logging_steps=1)
    ev = yaml.safe_load((RECIPES / "eval_small.yaml").read_text()) | {"benchmark_dir": str(vsp_dir / "maze_planning")}
    paths = {}
    for name, cfg in (("data", data), ("model", model), ("pretrain", pretrain), ("eval", ev)):
        paths[f"{name}_config"] = str(tmp_path / f"{name}.yaml")
        Path(paths[f"{name}_config"]).write_text(yaml.safe_dump(cfg))
    base = yaml.safe_load((RECIPES / "base_small.yaml").read_text())
    base.update(paths, cache_dir=str(tmp_path / "cache"), eval_levels=[4])
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_base_is_built_once_cached_by_key_and_rebuilt_when_a_config_changes(base_config, tmp_path, capsys):
    from mirage_rl.modeling import load_model

    cache = tmp_path / "cache"
    assert main(["base-model", "--config", str(base_config)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    built = Path(out["base"])
    assert built.parent == cache and built.name.startswith("seeing-tiny-") and len(built.name) == len("seeing-tiny-") + 12
    alias = cache / "seeing-tiny"
    assert alias.is_symlink() and alias.resolve() == built.resolve()
    record = json.loads((built / "base.json").read_text())
    assert set(record["wall_s"]) == {"data", "model", "pretrain", "eval_describe", "total"}
    assert record["perception"]["n"] == 100 and set(record["perception"]["by_level"]) == {"4"}
    assert 0 <= record["perception"]["cell_accuracy"] <= 1
    assert load_model(str(alias)).config.get_text_config().hidden_size == 32  # recipes load the alias
    assert not any(p.name.endswith(".tmp-build") for p in cache.iterdir())  # the work folder is gone
    # the same configs: reused, not rebuilt
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert main(["base-model", "--config", str(base_config)]) == 0
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp
    # a changed setting: a new key, a new base; the old one is kept and the alias follows
    cfg = yaml.safe_load(base_config.read_text())
    pretrain = yaml.safe_load(Path(cfg["pretrain_config"]).read_text()) | {"learning_rate": 5.0e-4}
    Path(cfg["pretrain_config"]).write_text(yaml.safe_dump(pretrain))
    assert main(["base-model", "--config", str(base_config)]) == 0
    again = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["base"])
    assert again != built and built.is_dir() and alias.resolve() == again.resolve()


def test_base_cache_refuses_a_foreign_alias_and_missing_data(base_config, tmp_path):
    from mirage_rl.base_model import BaseModelArguments, base_inputs, build_base
    from mirage_rl.recipe import parse

    (args,) = parse((BaseModelArguments,), ["--config", str(base_config)])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="notes.txt"):
        build_base(args)
    assert (cache / "notes.txt").read_text() == "mine"  # never deleted
    data = yaml.safe_load(Path(args.data_config).read_text()) | {"train_jsonl": str(tmp_path / "nope.jsonl")}
    Path(args.data_config).write_text(yaml.safe_dump(data))
    with pytest.raises(FileNotFoundError, match="train_jsonl .*nope.jsonl does not exist"):
        base_inputs(args)
