"""Stage-1 / stage-2 trainers on the tiny model: losses logged, every trainable parameter changes,
checkpoints reload into the next stage."""

import pytest
import torch

from mirage_rl.modeling import load_model, load_processor, save_pretrained
from mirage_rl.trainers import MirageSFTConfig, Stage1Trainer, Stage2Trainer


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                per_device_train_batch_size=4, max_steps=3, learning_rate=5e-3, logging_steps=1,
                save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return MirageSFTConfig(**base)


def _train(trainer_cls, model, processor, rows, args):
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_cls(model=model, args=args, train_dataset=rows, processing_class=processor)
    trainer.train()
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(before[n], p.detach())]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, unchanged, logs


def test_stage1_then_stage2_from_the_saved_checkpoint(any_tiny, small_rows, tmp_path):
    model, processor = any_tiny  # each backbone
    _, unchanged, logs = _train(Stage1Trainer, model, processor, small_rows, _config(tmp_path, stage=1))
    assert not unchanged, f"parameters that did not change in stage 1: {unchanged}"
    assert logs and all({"ce_loss", "cos_loss", "mean_token_accuracy"} <= set(h) for h in logs)
    first = logs[0]
    assert first["loss"] == pytest.approx(0.1 * first["ce_loss"] + first["cos_loss"], rel=1e-3)

    save_pretrained(model, processor, tmp_path / "stage1")
    model2, processor2 = load_model(tmp_path / "stage1"), load_processor(tmp_path / "stage1")
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    _, unchanged, logs = _train(Stage2Trainer, model2, processor2, small_rows,
                                _config(tmp_path, stage=2, latent_mode="hidden"))
    assert not unchanged, f"parameters that did not change in stage 2: {unchanged}"
    assert logs and "cos_loss" not in logs[0] and logs[0]["loss"] == pytest.approx(logs[0]["ce_loss"], rel=1e-4)


@pytest.mark.parametrize("mode", ["none", "dummy"])
def test_baselines_train(tiny, small_rows, tmp_path, mode):
    model, processor = tiny
    _, unchanged, logs = _train(Stage2Trainer, model, processor, small_rows,
                                _config(tmp_path, stage=2, latent_mode=mode, max_steps=2))
    assert not unchanged and logs


def test_stage2_with_gradient_checkpointing(tiny, small_rows, tmp_path):
    model, processor = tiny
    _, unchanged, logs = _train(Stage2Trainer, model, processor, small_rows,
                                _config(tmp_path, stage=2, max_steps=2, gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False}))
    assert not unchanged and logs


def test_latent_size_mismatch_is_a_clear_error(tiny, small_rows, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match="latent_size=8 in the recipe but 4 in the checkpoint"):
        Stage2Trainer(model=model, args=_config(tmp_path, latent_size=8), train_dataset=small_rows,
                      processing_class=processor)


def test_config_rejects_stage1_without_latents(tmp_path):
    with pytest.raises(ValueError, match="stage 1 teacher-forces"):
        _config(tmp_path, stage=1, latent_mode="none")


def test_train_vision_tower_trains_it_in_stage2_and_is_refused_in_stage1(tiny, small_rows, tmp_path):
    from mirage_rl.latent import backbone

    with pytest.raises(ValueError, match="stage 2 only"):
        _config(tmp_path, stage=1, train_vision_tower=True)
    model, processor = tiny
    visual = backbone(model).visual
    assert not any(p.requires_grad for p in visual.parameters())  # frozen by default (Mirage)
    visual.requires_grad_(True)  # what `mirage-rl sft` does for train_vision_tower: true
    _, unchanged, _ = _train(Stage2Trainer, model, processor, small_rows,
                             _config(tmp_path, stage=2, train_vision_tower=True))
    assert not unchanged and any(p.requires_grad for p in visual.parameters())


def test_residual_targets_are_the_helper_minus_the_input_image(tiny_dir, small_rows, tmp_path):
    """latent_target residual (ours, issue 21): the stage-1 targets are the pooled helper image minus the pooled input
    image of the same row (average pooling is linear: the pooled feature difference); one training step runs."""
    from mirage_rl import latent
    from mirage_rl.collator import LatentCollator
    from mirage_rl.modeling import LatentTokens, load_model, load_processor
    from mirage_rl.trainers import MirageSFTConfig, Stage1Trainer

    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    lt = LatentTokens.from_config(model.config)
    rows = [dict(small_rows[i]) for i in range(2)]
    batch = LatentCollator(processor, lt, "hidden", stage=1, reference_images=True)(rows)
    assert torch.equal(batch["reference_image_grid_thw"], batch["helper_image_grid_thw"])
    helper = latent.helper_targets(model, batch["helper_pixel_values"], batch["helper_image_grid_thw"], 4)
    ref = latent.helper_targets(model, batch["pixel_values"], batch["image_grid_thw"], 4)  # the rows' input maps
    refs = latent.helper_targets(model, batch["reference_pixel_values"], batch["reference_image_grid_thw"], 4)
    assert torch.equal(ref, refs)
    seen = {}
    args = MirageSFTConfig(output_dir=str(tmp_path / "o"), stage=1, latent_target="residual", max_steps=1,
                           per_device_train_batch_size=2, use_cpu=True, bf16=False, report_to="none",
                           save_strategy="no", logging_steps=1)
    trainer = Stage1Trainer(model=model, args=args, train_dataset=small_rows.select(range(2)), processing_class=processor)
    original = latent.latent_hidden_states

    def spy(*a, **kw):
        seen["inputs"] = kw.get("latent_inputs")
        return original(*a, **kw)

    latent.latent_hidden_states = spy
    try:
        trainer.train()
    finally:
        latent.latent_hidden_states = original
    assert torch.allclose(seen["inputs"], (helper - ref).reshape(-1, helper.shape[-1]), atol=1e-5)
    with pytest.raises(ValueError, match=r"latent_target must be one of \('helper', 'residual'\)"):
        MirageSFTConfig(output_dir=str(tmp_path / "p"), stage=1, latent_target="diff", use_cpu=True, report_to="none")
