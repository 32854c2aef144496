"""LoRA (``use_peft: true``) in every stage: what trains (LoRA on the language model, the latent token rows), what
stays frozen (vision tower, other embedding rows), adapter save/reload, stage 2 and GRPO on top of a stage-1
adapter, and the merged export (``mirage-rl export``) that ``eval`` loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mirage_rl.cli import main as cli
from mirage_rl.modeling import LatentTokens, load_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "vsp_spatial_planning"


def sft(stage: int, model, data, out, *extra: str):
    from trl import ModelConfig

    from mirage_rl.recipe import parse
    from mirage_rl.commands.sft import SFTScriptArguments, run_sft
    from mirage_rl.trainers import MirageSFTConfig

    argv = ["--config", str(RECIPES / f"stage{stage}_tiny.yaml"), "--model_name_or_path", str(model),
            "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1",
            "--save_strategy", "no", "--warmup_steps", "0", "--max_train_samples", "16", "--learning_rate", "2e-2",
            "--per_device_train_batch_size", "4", "--use_peft", "true", "--lora_r", "4", "--lora_dropout", "0", *extra]
    return run_sft(*parse((SFTScriptArguments, MirageSFTConfig, ModelConfig), argv))


def untied_copy(tiny_dir, out: Path) -> Path:
    """The tiny model with its LM head untied from the input embedding, like Qwen2.5-VL-7B."""
    from mirage_rl.modeling import load_processor, save_pretrained

    model = load_model(tiny_dir)
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    save_pretrained(model, load_processor(tiny_dir), out)
    reloaded = load_model(out)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()
    return out


@pytest.fixture(scope="module")
def stage1_adapter(tmp_path_factory, tiny_dir, small_dataset_dir):
    out = tmp_path_factory.mktemp("peft") / "stage1"
    trainer = sft(1, tiny_dir, small_dataset_dir, out)
    return out, trainer


def test_lora_trains_the_language_model_and_latent_rows_only(stage1_adapter, tiny_dir):
    out, trainer = stage1_adapter
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n and "language_model" in n) or "trainable_tokens" in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "mirage_adapter.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files and "training_args.bin" not in files
    lt = LatentTokens.from_config(load_model(tiny_dir).config)
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": sorted([lt.start, lt.pad, lt.end])}

    base, merged = load_model(tiny_dir).state_dict(), load_model(out).state_dict()
    emb = "model.language_model.embed_tokens.weight"
    rows = torch.tensor([lt.start, lt.pad, lt.end])
    others = torch.ones(base[emb].shape[0], dtype=torch.bool)
    others[rows] = False
    assert (merged[emb][rows] - base[emb][rows]).abs().max() > 1e-4  # latent rows learned
    assert torch.equal(merged[emb][others], base[emb][others])  # every other row untouched
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - base[q]).abs().max() > 1e-5  # LoRA merged in
    assert all(torch.equal(merged[k], base[k]) for k in base if ".visual." in k)  # vision tower frozen


def test_adapter_reload_equals_the_trained_model(stage1_adapter):
    out, trainer = stage1_adapter
    loaded = load_model(out)
    assert loaded.config.latent_mode == "hidden" and loaded.config.latent_size == 4
    in_memory = trainer.model.merge_and_unload().state_dict()
    got = loaded.state_dict()
    assert got.keys() == in_memory.keys()
    assert max((got[k] - in_memory[k]).abs().max().item() for k in got) < 1e-6


def test_stage2_and_grpo_on_top_of_the_stage1_adapter_then_export_and_eval(stage1_adapter, small_dataset_dir,
                                                                           vsp_dir, tmp_path, monkeypatch):
    stage1, _ = stage1_adapter
    sft(2, stage1, small_dataset_dir, tmp_path / "stage2")
    assert json.loads((tmp_path / "stage2" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(stage1)
    s1, s2 = load_model(stage1).state_dict(), load_model(tmp_path / "stage2").state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert (s2[q] - s1[q]).abs().max() > 1e-5  # stage 2 trained on top of the merged stage-1 weights

    monkeypatch.syspath_prepend(str(REPO / "tests" / "reliability"))  # toy_rewards: varies inside every group
    rc = cli(["grpo", "--config", str(RECIPES / "grpo_tiny.yaml"), "--model_name_or_path", str(stage1),
              "--dataset_path", str(small_dataset_dir), "--output_dir", str(tmp_path / "grpo"), "--max_steps", "2",
              "--logging_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "8",
              "--num_generations", "4", "--max_completion_length", "12", "--beta", "0.04", "--use_peft", "true",
              "--lora_r", "4", "--lora_dropout", "0", "--learning_rate", "2e-2",
              "--reward_funcs", "toy_rewards.length_reward", "--reward_weights", "1.0", "--reward_kwargs", "{}"])
    assert rc == 0
    log = [h for h in json.loads((tmp_path / "grpo" / "train_log.json").read_text()) if "loss" in h]
    assert len(log) == 2 and all(h["grad_norm"] > 0 for h in log) and "kl" in log[0]
    grpo_cfg = json.loads((tmp_path / "grpo" / "adapter_config.json").read_text())
    assert grpo_cfg["trainable_token_indices"] is None  # GRPO: LoRA only (see mirage_rl.lora)

    assert cli(["export", "--adapter_dir", str(tmp_path / "grpo"), "--output_dir", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    exported, adapter = load_model(tmp_path / "merged").state_dict(), load_model(tmp_path / "grpo").state_dict()
    assert max((exported[k] - adapter[k]).abs().max().item() for k in adapter) == 0.0
    assert cli(["eval", "--model", str(tmp_path / "merged"), "--benchmark_dir", str(vsp_dir / "maze_planning"),
                "--output_dir", str(tmp_path / "eval"), "--limit", "2", "--max_new_tokens", "8"]) == 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["n"] == 2


def test_untied_lm_head_trains_the_latent_rows_of_both(tiny_dir, small_dataset_dir, tmp_path):
    """Qwen2.5-VL-7B does not tie its LM head: its latent rows must be trainable too (else <|latent_start|> keeps the
    mean-initialised logit row)."""
    base_dir = untied_copy(tiny_dir, tmp_path / "untied")
    sft(1, base_dir, small_dataset_dir, tmp_path / "stage1")
    lt = LatentTokens.from_config(load_model(base_dir).config)
    rows = sorted([lt.start, lt.pad, lt.end])
    cfg = json.loads((tmp_path / "stage1" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"embed_tokens": rows, "lm_head": rows}
    base, merged = load_model(base_dir).state_dict(), load_model(tmp_path / "stage1").state_dict()
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        assert (merged[key][rows] - base[key][rows]).abs().max() > 1e-4, key


def test_missing_base_model_is_a_clear_error(stage1_adapter, tmp_path):
    import shutil

    out, _ = stage1_adapter
    moved = tmp_path / "adapter"
    shutil.copytree(out, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path"):
        load_model(moved)


def test_latent_interventions_run_on_a_lora_adapter(stage1_adapter, vsp_dir, tmp_path):
    """`eval --latent_intervention` on a LoRA adapter folder (merged at load, as plain eval)."""
    stage1, _ = stage1_adapter
    assert cli(["eval", "--model", str(stage1), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
                str(tmp_path / "iv"), "--limit", "2", "--max_new_tokens", "8", "--latent_intervention", "zero", "oracle",
                "skip"]) == 0
    report = json.loads((tmp_path / "iv" / "report.json").read_text())
    assert list(report["interventions"]) == ["none", "zero", "oracle", "skip"] and report["n"] == 2
