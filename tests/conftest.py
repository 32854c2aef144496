"""Shared fixtures: the tiny model built offline, and a small training set rendered from the real VSP data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIRAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
VSP = SHARED_DATA / "vsp"


def require_data():
    if not VSP.exists():
        pytest.skip(f"real VSP data not found at {VSP} (set MIRAGE_SHARED_DATA to the shared/data folder)")


@pytest.fixture(scope="session")
def vsp_dir():
    require_data()
    return VSP


#: the torch.distributed rendezvous a process reads from its environment
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _each_test_starts_without_a_leaked_rendezvous():
    """Every test starts from the rendezvous environment the session started with.

    TRL's vLLM colocate mode writes ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT`` into
    ``os.environ`` for vLLM's external launcher (trl/generation/vllm_generation.py, ``ensure_master_addr_port``) and
    never takes them back. In one process the next ``TrainingArguments`` resets accelerate's state, reads
    ``LOCAL_RANK`` and wraps its model in DistributedDataParallel (accelerate ``PartialState._prepare_backend``), and
    every subprocess a later test starts inherits them: once the backbone parametrization ran test_vllm's colocate
    tests before test_gpu_check, its checks failed only in the full suite. Restore them, and accelerate's state."""
    before = {key: os.environ.get(key) for key in RENDEZVOUS}
    yield
    if all(os.environ.get(key) == value for key, value in before.items()):
        return
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


#: the model families every test of the latent machinery runs on (issue 32)
BACKBONES = ("qwen2_5_vl", "qwen3_vl")
_TINY: dict[tuple, Path] = {}


def tiny_model_dir(tmp_path_factory, backbone: str = "qwen2_5_vl", latent_size: int | None = 4) -> Path:
    """The tiny model of ``backbone``, created once per session by the same function as `mirage-rl create-model`."""
    from mirage_rl.tiny import create_tiny_model

    key = (backbone, latent_size)
    if key not in _TINY:
        out = tmp_path_factory.mktemp("models") / f"tiny-{backbone}-{latent_size}"
        create_tiny_model(out, latent_size=latent_size, seed=0, backbone=backbone)
        _TINY[key] = out
    return _TINY[key]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny default (Qwen2.5-VL). A module whose tests run on every backbone overrides it with
    ``tiny_dir = per_backbone_tiny_dir`` (:func:`per_backbone_tiny_dir`)."""
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="session", params=BACKBONES)
def per_backbone_tiny_dir(request, tmp_path_factory):
    """The tiny model of each backbone in turn (the test runs once per family)."""
    return tiny_model_dir(tmp_path_factory, request.param)


@pytest.fixture()
def any_tiny(per_backbone_tiny_dir):
    """``(model, processor)`` of each backbone in turn."""
    from mirage_rl.modeling import load_model, load_processor

    return load_model(per_backbone_tiny_dir), load_processor(per_backbone_tiny_dir)


@pytest.fixture(scope="session")
def stock_dir(tmp_path_factory):
    """A tiny checkpoint shaped like a stock Qwen2.5-VL: no latent tokens in its tokenizer, config or embeddings."""
    from mirage_rl.tiny import create_tiny_model

    out = tmp_path_factory.mktemp("models") / "stock"
    create_tiny_model(out, latent_size=None, seed=0)
    return out


def scramble(model, std: float = 0.5, seed: int = 0):
    """Random weights with a large scale: the fresh tiny model predicts one token everywhere, which
    would make decoding tests vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std / max(1.0, p.shape[-1] ** 0.5) * 4)
    return model


@pytest.fixture()
def tiny(tiny_dir):
    from mirage_rl.modeling import load_model, load_processor

    return load_model(tiny_dir), load_processor(tiny_dir)


@pytest.fixture(scope="session")
def small_dataset_dir(tmp_path_factory, vsp_dir):
    from mirage_rl.data.build import BuildDataArguments, build_task_dataset

    out = tmp_path_factory.mktemp("data") / "vsp"
    build_task_dataset(BuildDataArguments(output_dir=str(out), train_jsonl=str(vsp_dir / "mirage_train_maps.jsonl"),
                                         test_dir=str(vsp_dir / "maze_planning"), max_train_maps=24,
                                         num_generated=8, seed=1))
    return out


@pytest.fixture(scope="session")
def small_rows(small_dataset_dir):
    from datasets import load_from_disk

    return load_from_disk(str(small_dataset_dir))["train"]


# ------------------------------------------------ reliability suite: datasets with one broken row, stock checkpoints
@pytest.fixture()
def rows_of(small_rows):
    """``rows_of(n)``: the first n rows of the small real dataset as plain dicts (decoded images)."""
    return lambda n: [dict(small_rows[i]) for i in range(n)]


@pytest.fixture()
def save_rows(small_rows, tmp_path):
    """``save_rows(rows)``: save rows with the small dataset's features as a DatasetDict; returns the folder."""
    from datasets import Dataset, DatasetDict

    def save(rows, name="data"):
        out = tmp_path / name
        DatasetDict({"train": Dataset.from_list(rows, features=small_rows.features)}).save_to_disk(str(out))
        return out

    return save


@pytest.fixture(scope="session")
def no_latent_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with its latent-token records removed from config.json (a stock Qwen2.5-VL shape)."""
    import shutil

    out = tmp_path_factory.mktemp("models") / "no_latent"
    shutil.copytree(tiny_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    for key in ("latent_token_ids", "latent_size", "latent_mode"):
        cfg.pop(key, None)
    (out / "config.json").write_text(json.dumps(cfg))
    return out
