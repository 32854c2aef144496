import pytest
import torch

from mirage_rl.modeling import LATENT_TOKENS, LatentTokens, add_latent_tokens, load_model, load_processor
from mirage_rl.tiny import create_tiny_model, tiny_config


def _inputs(processor, image):
    from mirage_rl.data import messages
    from mirage_rl.tasks.vsp_planning import prompts

    text = processor.apply_chat_template(messages.to_messages(prompts.TEST_PROMPT), add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


def test_reload_reproduces_logits(tmp_path, vsp_dir):
    from PIL import Image

    model, processor = create_tiny_model(tmp_path / "m", seed=1)
    reloaded, proc2 = load_model(tmp_path / "m"), load_processor(tmp_path / "m")
    enc = _inputs(proc2, Image.open(vsp_dir / "maze_planning/level4/img/3.png"))
    assert enc["mm_token_type_ids"].sum() == 36  # a VSP map costs 6x6 merged visual tokens
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, reloaded(**enc).logits)
    assert reloaded.config.latent_token_ids == model.config.latent_token_ids
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_vision_tower_is_frozen(tiny):
    model, _ = tiny
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_add_latent_tokens_to_a_checkpoint_without_them(tiny_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_processor(tiny_dir)
    tok = processor.tokenizer
    # a stock checkpoint: same tokenizer minus the latent tokens, a model with the smaller vocabulary
    base_vocab = min(tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    cfg = tiny_config(base_vocab)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    assert getattr(model.config, "latent_token_ids", None) is None
    with pytest.raises(ValueError, match="no latent tokens"):
        LatentTokens.from_config(model.config)
    tokens = add_latent_tokens(model, processor, latent_size=6)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert [tok.convert_ids_to_tokens(i) for i in (tokens.start, tokens.pad, tokens.end)] == list(LATENT_TOKENS)
    assert LatentTokens.from_config(model.config) == tokens
    new_row = model.get_input_embeddings().weight[tokens.pad]
    assert torch.allclose(new_row, model.get_input_embeddings().weight[:base_vocab].mean(0))
    with pytest.raises(ValueError, match="latent_size=6.*asks for 4"):
        add_latent_tokens(model, processor, latent_size=4)


def test_rope_theta_and_pixels_reach_the_checkpoint(tmp_path):
    from PIL import Image

    from mirage_rl.modeling import load_model, load_processor
    from mirage_rl.tiny import create_tiny_model

    create_tiny_model(tmp_path / "m", hidden_size=32, rope_theta=10.0, max_pixels=113 * 113, min_pixels=100 * 100)
    cfg = load_model(tmp_path / "m").config.text_config
    assert cfg.rope_parameters["rope_theta"] == 10.0
    processor = load_processor(tmp_path / "m")
    grid = processor.image_processor(images=[Image.new("RGB", (256, 256))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]  # 112 x 112 px: 8 x 8 patches of 14 px, 4 x 4 visual tokens
    with pytest.raises(ValueError, match="min_pixels=.*max_pixels"):
        create_tiny_model(tmp_path / "bad", hidden_size=32, min_pixels=200 * 200, max_pixels=100 * 100)


def test_the_processor_loads_without_torchvision(per_backbone_tiny_dir, monkeypatch):
    """transformers 5.17 without torchvision (a plain `make install`: only the vLLM extra brings it) makes
    AutoImageProcessor a placeholder that raises on use; both families' processors are read without it, with PIL's
    image processor (the demo failed at its first load before)."""
    import transformers

    from mirage_rl.modeling import load_processor

    class Placeholder:
        @classmethod
        def from_pretrained(cls, *a, **k):
            raise ImportError("AutoImageProcessor requires the Torchvision library")

    monkeypatch.setattr(transformers, "AutoImageProcessor", Placeholder)
    processor = load_processor(per_backbone_tiny_dir)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.image_processor.patch_size == (16 if "qwen3_vl" in per_backbone_tiny_dir.name else 14)
