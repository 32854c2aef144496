"""The latent fill: equivalence with a full forward, gradient parity with the multi-pass fill, layouts."""

import pytest
import torch

from mirage_rl import latent
from mirage_rl.collator import LatentCollator
from mirage_rl.data.messages import LATENT_MARKER
from mirage_rl.modeling import LatentTokens
from conftest import per_backbone_tiny_dir, scramble

tiny_dir = per_backbone_tiny_dir  # every test here runs on each backbone


def _batch(model, processor, rows, **kw):
    c = LatentCollator(processor, LatentTokens.from_config(model.config), "hidden", **kw)
    b = c(rows)
    emb, b["visual"] = latent.embed_inputs(model, b["input_ids"], b["pixel_values"], b["image_grid_thw"])
    pos, _ = latent.position_ids(model, b["input_ids"], b["attention_mask"], b["mm_token_type_ids"], b["image_grid_thw"])
    return b, emb, pos


def _full_forward_with(model, emb, pos, b, hidden):
    """One plain forward whose latent inputs are the given hidden states of the previous positions."""
    shifted = torch.cat([hidden[:, :1], hidden[:, :-1]], 1)
    e = torch.where(b["latent_mask"][..., None], shifted, emb)
    return latent._lm_forward(latent.language_model(model), e, pos, b["attention_mask"], visual=b["visual"])


def _mixed_rows(small_rows):
    """Rows with one block, two blocks, none, and different image sizes (3x3 ... 6x6 maps)."""
    rows = [dict(small_rows[i]) for i in range(4)]
    rows[1]["answer"] = LATENT_MARKER + "step " + LATENT_MARKER + rows[1]["solution"]
    rows[2]["answer"] = rows[2]["solution"]
    return rows


def rows_of_distinct_sizes(rows, n=4):
    by_size = {}
    for r in rows:
        by_size.setdefault(len(r["map_desc"]), r)
    assert len(by_size) >= n, sorted(by_size)
    return [by_size[k] for k in sorted(by_size)[:n]]


def native_size_processor(processor):
    """A pixel budget under which maps of different sizes keep different visual-token grids."""
    ip = processor.image_processor
    processor.image_processor = type(ip)(min_pixels=56 * 56, max_pixels=400 * 400, patch_size=ip.patch_size,
                                         merge_size=ip.merge_size, image_mean=ip.image_mean, image_std=ip.image_std)
    return processor


@pytest.mark.parametrize("layout", ["aligned", "mixed", "image_sizes"])
def test_cached_fill_equals_full_forward(tiny, small_rows, layout):
    model, processor = tiny
    scramble(model, std=0.1)
    model.eval()
    rows = [small_rows[i] for i in range(4)] if layout == "aligned" else _mixed_rows(small_rows)
    if layout == "image_sizes":
        native_size_processor(processor)
        rows = rows_of_distinct_sizes(small_rows)
    b, emb, pos = _batch(model, processor, rows)
    if layout == "image_sizes":
        assert len({tuple(t) for t in b["image_grid_thw"].tolist()}) >= 3, b["image_grid_thw"]
    if layout == "aligned":
        first = [int(r.nonzero()[0]) for r in b["latent_mask"]]
        assert len(set(first)) == 1  # left padding aligns the first slot of every row
    with torch.no_grad():
        h = latent.latent_fill(model, emb, pos, b["attention_mask"], b["latent_mask"], "cached", visual=b["visual"])
        full = _full_forward_with(model, emb, pos, b, h)
    assert (h - full).abs().max() < 1e-5
    # the latents really matter: a fill with the pad embedding differs
    with torch.no_grad():
        plain = latent._lm_forward(latent.language_model(model), emb, pos, b["attention_mask"], visual=b["visual"])
    assert (plain - h).abs().max() > 1e-3


def _stock_hidden(model, b):
    """The model's own forward (transformers' code: its positions, its DeepStack), last hidden states."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return model.model(**{k: b[k] for k in keys}).last_hidden_state


@pytest.mark.parametrize("method", ["cached", "keystore", "multipass"])
def test_fill_equals_the_stock_forward_before_the_first_slot(tiny, small_rows, method):
    # Every decoder call on image tokens gets its columns' positions and DeepStack injection: before the first slot
    # (where the slots' inputs cannot reach yet) the fill is the model's own forward, for every fill method.
    model, processor = tiny
    scramble(model, std=0.1)
    model.eval()
    b, emb, pos = _batch(model, processor, _mixed_rows(small_rows))
    first = int(b["latent_mask"].any(0).nonzero().min())
    with torch.no_grad():
        stock = _stock_hidden(model, b)
        ours = latent.latent_hidden_states(model, b["input_ids"], b["attention_mask"], b["pixel_values"],
                                           b["image_grid_thw"], b["mm_token_type_ids"], b["latent_mask"],
                                           method=method)
    real = b["attention_mask"].bool()
    real[:, first:] = False
    assert int((b["input_ids"][real] == model.config.image_token_id).sum()) > 0
    assert (stock - ours)[real].abs().max() < 1e-5


def test_qwen3_vl_fails_without_deepstack_or_explicit_positions(tmp_path_factory, small_rows, monkeypatch):
    # The two silent traps of Qwen3-VL (issue 32): the equality above fails when DeepStack is skipped, and when the
    # decoder gets text positions instead of get_rope_index's (the "logits off by 0.12, no warning" case).
    from conftest import tiny_model_dir
    from mirage_rl import backbones
    from mirage_rl.modeling import load_model, load_processor

    folder = tiny_model_dir(tmp_path_factory, "qwen3_vl")
    model, processor = load_model(folder), load_processor(folder)
    scramble(model, std=0.1)
    model.eval()
    b, emb, pos = _batch(model, processor, [small_rows[0], small_rows[1]])
    args = (model, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"], b["mm_token_type_ids"])
    real = b["attention_mask"].bool()
    with torch.no_grad():
        stock = _stock_hidden(model, b)
        assert (latent.latent_hidden_states(*args) - stock)[real].abs().max() < 1e-5
        with monkeypatch.context() as m:  # DeepStack skipped
            m.setattr(backbones.qwen3_vl.Qwen3VL, "injection", lambda self, mask, features: None)
            assert (latent.latent_hidden_states(*args) - stock)[real].abs().max() > 1e-2
        with monkeypatch.context() as m:  # 1-D text positions
            text = lambda model, ids, am, *a: ((am.long().cumsum(-1) - 1).clamp(min=0).expand(3, -1, -1), am.sum(-1))
            m.setattr(latent, "position_ids", text)
            assert (latent.latent_hidden_states(*args) - stock)[real].abs().max() > 1e-2
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        latent.position_ids(model, b["input_ids"], b["attention_mask"], None, b["image_grid_thw"])


def test_cached_fill_gradients_equal_multipass(tiny, small_rows):
    # float64 separates real differences from rounding: a fill that cut the gradient through the latent
    # inputs (e.g. a detached hidden state) differs by ~1e-2 relative here; rounding stays below 1e-7
    model, processor = tiny
    scramble(model, seed=2, std=0.1)
    model.double().train()
    b, emb, pos = _batch(model, processor, _mixed_rows(small_rows))
    grads = {}
    for method in ("cached", "multipass"):
        model.zero_grad()
        h = latent.latent_fill(model, emb.detach(), pos, b["attention_mask"], b["latent_mask"], method,
                               visual=b["visual"])
        (h * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum().backward()
        grads[method] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["cached"].keys() == grads["multipass"].keys() and grads["cached"]
    for n, g in grads["cached"].items():
        ref = grads["multipass"][n]
        assert (g - ref).abs().max() <= 1e-6 * ref.abs().max().clamp(min=1e-12), n


def test_helper_targets_average_and_grid(tiny, small_rows):
    model, processor = tiny
    scramble(model, seed=4)
    c = LatentCollator(processor, LatentTokens.from_config(model.config), "hidden", stage=1)
    b = c([small_rows[0], small_rows[1]])
    feats = model.model.get_image_features(b["helper_pixel_values"], b["helper_image_grid_thw"]).pooler_output
    avg = latent.helper_targets(model, b["helper_pixel_values"], b["helper_image_grid_thw"], 4, "average")
    grid = latent.helper_targets(model, b["helper_pixel_values"], b["helper_image_grid_thw"], 4, "grid")
    assert avg.shape == grid.shape == (2, 4, model.config.text_config.hidden_size)
    f = feats[0]  # 36 merged tokens in raster order of a 6x6 grid
    assert torch.allclose(avg[0, 0], f[:9].mean(0), atol=1e-6)
    top_left = f.view(6, 6, -1)[:3, :3].reshape(9, -1).mean(0)
    assert torch.allclose(grid[0, 0], top_left, atol=1e-5)
    with pytest.raises(ValueError, match="compress"):
        latent.helper_targets(model, b["helper_pixel_values"], b["helper_image_grid_thw"], 4, "max")


def _stagger(b, emb, pos, shifts):
    """Shift row i right by shifts[i] masked columns (the collator aligns blocks; rollouts do not)."""
    width = b["input_ids"].shape[1] + max(shifts)
    out = {"attention_mask": b["attention_mask"].new_zeros(len(shifts), width),
           "latent_mask": b["latent_mask"].new_zeros(len(shifts), width)}
    cols = torch.arange(b["input_ids"].shape[1])[None] + torch.tensor(shifts)[:, None]
    out["visual"] = b["visual"].realign(cols, width) if b["visual"] is not None else None
    e, p = emb.new_zeros(len(shifts), width, emb.shape[-1]), pos.new_zeros(3, len(shifts), width)
    for i, s in enumerate(shifts):
        n = b["input_ids"].shape[1]
        for key in ("attention_mask", "latent_mask"):
            out[key][i, s:s + n] = b[key][i]
        e[i, s:s + n], p[:, i, s:s + n] = emb[i], pos[:, i]
    return out, e, p


def test_misaligned_blocks_are_realigned_into_k_steps_per_block(tiny, small_rows):
    model, processor = tiny
    scramble(model, seed=4, std=0.1)
    model.double().train()
    rows = _mixed_rows(small_rows)  # rows with one block, two blocks, none
    b, emb, pos = _stagger(*_batch(model, processor, rows), shifts=[0, 5, 9, 2])
    mask, k = b["latent_mask"], model.config.latent_size
    distinct = int(mask.any(0).sum())
    assert distinct > 2 * k  # the blocks really sit in different columns
    cols = latent.aligned_columns(mask)
    assert cols is not None and bool((cols[:, 1:] > cols[:, :-1]).all())
    moved = torch.zeros(mask.shape[0], int(cols.max()) + 1, dtype=torch.bool)
    moved[torch.arange(mask.shape[0])[:, None], cols] = mask
    assert int(moved.any(0).sum()) == 2 * k  # every row's r-th block in the same k columns
    calls = []
    hook = latent.language_model(model).register_forward_pre_hook(lambda m, a: calls.append(1))
    outs, grads = {}, {}
    try:
        for method in ("cached", "multipass", "unaligned"):
            model.zero_grad()
            calls.clear()
            e = emb.detach().requires_grad_(True)
            if method == "unaligned":
                h = latent._fill_cached(latent.language_model(model), e, pos, b["attention_mask"], mask,
                                        visual=b["visual"])
            else:
                h = latent.latent_fill(model, e, pos, b["attention_mask"], mask, method, visual=b["visual"])
            (h * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum().backward()
            outs[method], grads[method] = (h.detach(), len(calls)), e.grad
    finally:
        hook.remove()
    assert outs["cached"][1] <= 2 * k + 3 < outs["unaligned"][1] == distinct + 1
    real = b["attention_mask"].bool()
    for other in ("multipass", "unaligned"):
        assert (outs["cached"][0] - outs[other][0]).abs()[real].max() < 1e-9, other
        scale = grads[other].abs().max()
        assert (grads["cached"] - grads[other]).abs().max() <= 1e-6 * scale, other  # rounding: ~4e-7 measured


def test_latent_mode_has_one_type_and_one_resolver(tiny):
    import pytest
    from types import SimpleNamespace

    from mirage_rl.collator import LatentCollator
    from mirage_rl.generation import generate
    from mirage_rl.latent import LatentMode, parse_latent_mode, resolve_latent_mode
    from mirage_rl.trainers import MirageGRPOConfig, MirageSFTConfig

    model, processor = tiny
    assert [m.value for m in LatentMode] == ["hidden", "dummy", "none"] and LatentMode.DUMMY == "dummy"
    # requested, else recorded, else hidden when the checkpoint has latent tokens, else an error saying what to do
    assert resolve_latent_mode("dummy", model.config) is LatentMode.DUMMY
    assert resolve_latent_mode(None, SimpleNamespace(latent_mode="none", latent_token_ids={"start": 1})) is LatentMode.NONE
    assert resolve_latent_mode(None, model.config) is LatentMode.HIDDEN
    with pytest.raises(ValueError, match="no latent tokens and records no latent_mode; pass --latent_mode none"):
        resolve_latent_mode(None, SimpleNamespace(), where="ckpt")
    # a typo fails at every entry point, generate included (it used to decode as the dummy control)
    message = r"latent_mode must be one of \('hidden', 'dummy', 'none'\), got 'hiden'"
    for build in (lambda: parse_latent_mode("hiden"), lambda: LatentCollator(processor, None, "hiden"),
                  lambda: MirageSFTConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, latent_mode="hiden"),
                  lambda: MirageGRPOConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, latent_mode="hiden",
                                           per_device_train_batch_size=4, num_generations=4),
                  lambda: generate(model, processor, {}, latent_mode="hiden")):
        with pytest.raises(ValueError, match=message):
            build()


def test_rewards_stay_light_and_lora_does_not_import_modeling():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = "import sys, rewards; assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    tree = ast.parse((repo / "mirage_rl" / "lora.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.endswith("modeling") for m in imported)  # modeling -> lora only: no cycle


def test_one_way_to_patch_a_method_and_undo_it():
    from mirage_rl.patching import is_patched, original, patch_method, unpatch_method

    class Box:
        def size(self):
            return 1

    box = Box()
    patch_method(box, "size", lambda self: original(self, "size")() + 10)
    patch_method(box, "size", lambda self: original(self, "size")() + 20)  # again: the first original is kept
    assert box.size() == 21 and is_patched(box, "size") and Box().size() == 1  # the class is untouched
    unpatch_method(box, "size")
    assert box.size() == 1 and not is_patched(box, "size") and vars(box) == {}
