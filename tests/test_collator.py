import pytest

from mirage_rl.collator import LatentCollator
from mirage_rl.modeling import LatentTokens


def test_labels_mask_prompt_padding_slots_and_forced_end(tiny, small_rows):
    model, processor = tiny
    lt = LatentTokens.from_config(model.config)
    b = LatentCollator(processor, lt, "hidden")([small_rows[i] for i in range(3)])
    ids, labels = b["input_ids"], b["labels"]
    assert (b["latent_mask"].sum(1) == lt.latent_size).all()
    assert (labels[b["latent_mask"]] == -100).all()
    assert (labels[ids == lt.end] == -100).all()
    assert (labels[ids == lt.start] == lt.start).all()  # the model learns to open the block
    assert (labels[b["attention_mask"] == 0] == -100).all()
    assert (labels[b["mm_token_type_ids"] == 1] == -100).all()
    text = processor.tokenizer.decode(ids[0][labels[0] != -100])
    assert text.endswith(small_rows[0]["solution"] + "<|im_end|>")


def test_direct_sft_drops_the_latent_block(tiny, small_rows):
    model, processor = tiny
    b = LatentCollator(processor, None, "none")([small_rows[0]])
    lt = LatentTokens.from_config(model.config)
    assert not b["latent_mask"].any() and not (b["input_ids"] == lt.start).any()


def test_stage1_needs_one_helper_image_per_block(tiny, small_rows):
    model, processor = tiny
    row = dict(small_rows[0])
    row["helper_image"] = None
    with pytest.raises(ValueError, match=r"row 0 \(map_id=.*\): 1 latent block.*0 helper image"):
        LatentCollator(processor, LatentTokens.from_config(model.config), "hidden", stage=1)([row])


def test_long_rows_raise_instead_of_truncating(tiny, small_rows):
    model, processor = tiny
    # far too long: refused before tokenizing (a row just over the bound is refused after: test_bad_inputs.py)
    with pytest.raises(ValueError, match=r"row 0 \(map_id=.*\): \d+ characters cannot fit in max_length=50 tokens"):
        LatentCollator(processor, LatentTokens.from_config(model.config), "hidden", max_length=50)([small_rows[0]])
