import pytest
import torch

from mirage_rl.collator import LatentCollator
from mirage_rl.generation import generate
from mirage_rl.modeling import LatentTokens
from conftest import scramble
from test_latent import native_size_processor, rows_of_distinct_sizes
from conftest import per_backbone_tiny_dir

tiny_dir = per_backbone_tiny_dir  # every test here runs on each backbone


@pytest.mark.parametrize("image_sizes", ["fixed", "native"])
def test_batched_greedy_equals_each_row_alone_with_rows_in_and_out_of_latent_mode(tiny, small_rows, image_sizes):
    model, processor = tiny
    if image_sizes == "native":  # maps of different sizes keep different visual-token grids in one batch
        native_size_processor(processor)
    scramble(model, seed=5)
    model.eval()
    lt = LatentTokens.from_config(model.config)
    # make <|latent_start|> likely so rows open latent blocks on their own, at different steps
    with torch.no_grad():
        model.lm_head.weight[lt.start] *= 3.0
    rows = rows_of_distinct_sizes(small_rows) if image_sizes == "native" else [small_rows[i] for i in range(4)]
    # two rows start inside a latent block (their prompt ends with <|latent_start|>), two decode text first
    collator = LatentCollator(processor, lt, "hidden", with_answer=False)
    enc = [collator.encode(r, i) for i, r in enumerate(rows)]
    for e in enc[:2]:
        e["input_ids"] = torch.cat([e["input_ids"], torch.tensor([lt.start])])
        e["mm_token_type_ids"] = torch.cat([e["mm_token_type_ids"], e["mm_token_type_ids"].new_zeros(1)])
        e["latent_mask"] = torch.cat([e["latent_mask"], torch.tensor([False])])
    batch = collator.pad(enc)
    if image_sizes == "native":
        assert len({tuple(t) for t in batch["image_grid_thw"].tolist()}) >= 3
    out = generate(model, processor, batch, max_new_tokens=24)
    seqs = out.sequences
    starts = [(s == lt.start).nonzero().flatten().tolist() for s in seqs]
    pads = [(s == lt.pad).nonzero().flatten().tolist() for s in seqs]
    assert pads[0][:4] == [0, 1, 2, 3] and seqs[0, 4] == lt.end  # k slots then the forced end
    assert any(starts[2:]), "no text row opened a latent block on its own"
    # at some step one row is in latent mode while another decodes text
    in_latent = seqs == lt.pad
    assert (in_latent.any(0) & (~in_latent).any(0)).any()
    for i in range(4):
        alone = generate(model, processor, collator.pad([enc[i]]), max_new_tokens=24).sequences[0]
        assert torch.equal(alone, seqs[i, : len(alone)]), f"row {i} differs when decoded alone"


def test_plain_mode_matches_hf_generate(tiny, small_rows):
    model, processor = tiny
    scramble(model, seed=6)
    model.eval()
    collator = LatentCollator(processor, None, "none", with_answer=False)
    b = collator([small_rows[0], small_rows[5]])
    ours = generate(model, processor, b, max_new_tokens=8, latent_mode="none").sequences
    hf = model.generate(**{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                             "mm_token_type_ids")}, max_new_tokens=8, do_sample=False,
                        eos_token_id=None, min_new_tokens=8)
    assert torch.equal(ours, hf[:, b["input_ids"].shape[1]:][:, : ours.shape[1]])


def test_sampling_is_seeded(tiny, small_rows):
    model, processor = tiny
    scramble(model, seed=7)
    model.eval()
    b = LatentCollator(processor, LatentTokens.from_config(model.config), "hidden", with_answer=False)([small_rows[1]] * 3)
    a = generate(model, processor, b, 12, do_sample=True, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(0)).sequences
    c = generate(model, processor, b, 12, do_sample=True, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(0)).sequences
    assert torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) > 1  # three samples of one prompt differ
