"""Loading (issue 16, part 5): a missing local model is a local error at once, an unreachable hub id fails within
seconds, broken weights and missing tokenizer files name the file, and a full disk removes the incomplete save."""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

import pytest

from mirage_rl.cli import main
from mirage_rl.modeling import load_model, load_processor

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "vsp_spatial_planning"


@pytest.fixture()
def offline_hub(monkeypatch):
    """The hub endpoint pointed at a closed local port (connection refused at once): no traffic leaves the machine."""
    from huggingface_hub import constants

    import mirage_rl.modeling as modeling

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(modeling, "_hub_reachable", {})
    return constants


def test_a_missing_local_model_is_a_local_error_at_once(small_dataset_dir, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["sft", "--config", str(RECIPES / "stage2_tiny.yaml"), "--model_name_or_path", "outputs/models/nope",
                 "--dataset_path", str(small_dataset_dir), "--output_dir", str(tmp_path / "s2")]) == 1
    err = capsys.readouterr().err
    assert "model outputs/models/nope does not exist (and is not an org/name hub id); did the stage that writes " \
           "it finish? Stage 2 starts from stage 1's output_dir" in err
    assert time.perf_counter() - t0 < 10 and "Traceback" not in err and "Repo id" not in err
    with pytest.raises(FileNotFoundError, match=r"model /no/such/folder does not exist"):
        load_model("/no/such/folder")


def test_an_unreachable_hub_id_fails_within_seconds_saying_it_is_not_available_offline(offline_hub, monkeypatch):
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"model someorg/some-model: no such local folder, and the hub id "
                                                r"someorg/some-model is not available offline \(not in the local cache, "
                                                r"and http://127.0.0.1:9 cannot be reached\)"):
        load_model("someorg/some-model")
    assert time.perf_counter() - t0 < 5
    monkeypatch.setattr(offline_hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"model someorg/some-model: .*not available offline.*under "
                                                r"HF_HUB_OFFLINE"):
        load_processor("someorg/some-model")


def cache_as_hub_id(folder: Path, cache: Path, hub_id: str, hub_constants, monkeypatch) -> None:
    """Put ``folder`` into the hub cache ``cache`` as the model ``hub_id`` (``org/name``) and point the hub at it."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))


def test_a_cached_hub_model_loads_offline(offline_hub, tiny_dir, tmp_path, monkeypatch):
    from mirage_rl.modeling import check_source

    cache_as_hub_id(tiny_dir, tmp_path / "hub", "someorg/tiny", offline_hub, monkeypatch)
    assert check_source("someorg/tiny") == {"local_files_only": True}  # cached: no download is tried
    assert load_model("someorg/tiny").config.latent_size == 4


def copy_model(tiny_dir, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_dir, out)
    return out


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_broken_weights_name_the_file(damage, tiny_dir, vsp_dir, tmp_path, capsys):
    out = copy_model(tiny_dir, tmp_path)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"{not json" + data[17:])
    expected = (rf"{weights}: truncated or corrupted safetensors file \({len(data) // 2} bytes, its header describes "
                rf"{len(data)}\): copy it again or save the model again" if damage == "truncated" else
                rf"{weights}: its safetensors header is not valid; the file is corrupted")
    with pytest.raises(ValueError, match=expected):
        load_model(out)
    assert main(["eval", "--model", str(out), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
                 str(tmp_path / "e"), "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and "Traceback" not in err and err.count("\n") == 1


def test_a_model_folder_without_tokenizer_files_says_so(tiny_dir, tmp_path):
    out = copy_model(tiny_dir, tmp_path)
    (out / "tokenizer.json").unlink()
    (out / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"tokenizer files missing in {out}: \['tokenizer_config.json', "
                                                r"'tokenizer.json \(or vocab.json \+ merges.txt\)'\]"):
        load_processor(out)


def full_disk(path):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_during_a_checkpoint_removes_it_and_says_so(tiny_dir, small_dataset_dir, tmp_path, monkeypatch,
                                                                capsys):
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def save_optimizer(self, output_dir):
        if self.state.global_step == 2:
            raise full_disk(Path(output_dir) / "optimizer.pt")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save_optimizer)
    out = tmp_path / "s2"
    argv = ["sft", "--config", str(RECIPES / "stage2_tiny.yaml"), "--model_name_or_path", str(tiny_dir),
            "--dataset_path", str(small_dataset_dir), "--output_dir", str(out), "--max_steps", "3", "--save_steps",
            "1", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"no space left on device writing {out / 'checkpoint-2'}" in err
    assert "the incomplete checkpoint checkpoint-2 was removed; the last complete checkpoint is kept" in err
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-1" / "mirage_checkpoint.json").exists()
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)  # space freed: the same command resumes
    assert main(argv) == 0 and (out / "model.safetensors").exists()


def test_a_full_disk_during_the_final_save_removes_the_temp_folder(tiny_dir, small_dataset_dir, tmp_path, monkeypatch,
                                                                   capsys):
    import transformers.modeling_utils as modeling_utils

    def save_file(tensors, filename, metadata=None):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
    out = tmp_path / "s2"
    assert main(["sft", "--config", str(RECIPES / "stage2_tiny.yaml"), "--model_name_or_path", str(tiny_dir),
                 "--dataset_path", str(small_dataset_dir), "--output_dir", str(out), "--max_steps", "1",
                 "--save_strategy", "no", "--per_device_train_batch_size", "2"]) == 1
    err = capsys.readouterr().err
    assert f"no space left on device writing {out}" in err and "incomplete final save was removed" in err
    assert not list(tmp_path.glob(".s2.tmp-*")) and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("model_type", ["qwen3_5", "llava"])
def test_a_checkpoint_of_another_model_family_is_refused_in_one_line(model_type, tiny_dir, vsp_dir, tmp_path, capsys,
                                                                       offline_hub, monkeypatch):
    """transformers would load it into another family's classes with a warning and mismatched weights; mirage-rl
    refuses it before any weight is read, local folder or cached hub id, naming the model type and what is supported
    (Qwen3.5: hybrid linear attention, no DeepStack; out of scope, issue 32)."""
    import json

    out = copy_model(tiny_dir, tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    expected = (rf"{out / 'config.json'}: model_type '{model_type}' is not supported; mirage-rl trains and decodes "
                r"qwen2_5_vl \(Qwen2.5-VL\), qwen3_vl \(Qwen3-VL\) checkpoints")
    with pytest.raises(ValueError, match=expected):
        load_model(out)
    assert main(["eval", "--model", str(out), "--benchmark_dir", str(vsp_dir / "maze_planning"), "--output_dir",
                 str(tmp_path / "e"), "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert f"model_type '{model_type}' is not supported" in err and "Traceback" not in err and err.count("\n") == 1
    cache_as_hub_id(out, tmp_path / "hub", "someorg/other", offline_hub, monkeypatch)  # the same, as a cached hub id
    with pytest.raises(ValueError, match=rf"someorg/other \(config.json\): model_type '{model_type}' is not supported"):
        load_model("someorg/other")
