"""The benchmark scripts' model shapes: ``--size 3b/7b`` are Qwen2.5-VL-3B/7B to the parameter."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402  (bench/common.py)
from mirage_rl import backbones  # noqa: E402


@pytest.mark.parametrize("size", sorted(common.SHAPES))
def test_shaped_configs_have_the_released_parameter_counts(tiny_dir, size):
    tiny = AutoConfig.from_pretrained(tiny_dir)
    config = common.shaped_config(size, tiny)
    with torch.device("meta"):
        model = backbones.get(config.model_type).model_class(config)
    assert config.model_type == common.size_backbone(size)
    assert sum(p.numel() for p in model.parameters()) == common.SHAPES[size]["parameters"]
    # the tiny tokenizer's special tokens and latent tokens carry over
    assert config.image_token_id == tiny.image_token_id and config.latent_token_ids == tiny.latent_token_ids
    assert config.get_text_config().eos_token_id == tiny.get_text_config().eos_token_id


def test_unknown_size_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="choose one of"):
        common.shaped_config("70b", AutoConfig.from_pretrained(tiny_dir))
