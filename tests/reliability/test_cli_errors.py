"""One clean line per user error (issue 16, part 6): what, where, how to fix, a non-zero exit and no traceback;
--debug or MIRAGE_RL_DEBUG=1 shows it; internal errors keep their traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirage_rl.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "vsp_spatial_planning"


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("cmd", ["sft", "grpo", "eval", "export"])
def test_a_command_without_arguments_prints_its_usage(cmd, capsys):
    assert main([cmd]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: mirage-rl {cmd} ") and f"`mirage-rl {cmd} --help` lists every option" in err
    assert "bf16" not in err and len(err.splitlines()) <= 5


def test_a_bad_option_value_names_the_command_and_option_in_one_line(capsys):
    assert main(["sft", "--config", str(RECIPES / "stage1_tiny.yaml"), "--learning_rate", "fast"]) == 2
    err = one_line(capsys)
    assert err.startswith("mirage-rl sft: error: argument --learning_rate/--learning-rate: invalid float value: 'fast'")
    assert main(["grpo", "--config", str(RECIPES / "grpo_tiny.yaml"), "--no_such_option", "1"]) == 2
    assert "no_such_option" in one_line(capsys)


def test_a_config_that_is_a_folder_says_so(capsys):
    assert main(["sft", "--config", str(RECIPES)]) == 2
    assert f"--config {RECIPES} is a folder, not a recipe file: pass one YAML file" in one_line(capsys)


def test_a_duplicate_key_in_a_recipe_is_an_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: 2\nmax_steps: 5\nlatent_size: 4\nmax_steps: 50\n")
    assert main(["sft", "--config", str(recipe)]) == 2
    err = one_line(capsys)
    assert f"{recipe}:4: duplicate key 'max_steps' (first on line 2); keep one of them" in err


def test_an_unknown_command_is_one_line(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; commands: build-data, create-model, sft" in one_line(capsys)


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(tmp_path, monkeypatch, capsys):
    argv = ["eval", "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "e")]
    assert main(argv) == 1
    assert "does not exist" in one_line(capsys)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(argv + ["--debug"])
    monkeypatch.setenv("MIRAGE_RL_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(argv)
    monkeypatch.delenv("MIRAGE_RL_DEBUG")

    import mirage_rl.evaluation as evaluation

    def broken(*a, **k):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(evaluation, "evaluate", broken)
    with pytest.raises(KeyError, match="a bug"):  # an internal error is not turned into one line
        main(argv)
