"""Shared fixtures: the tiny model built offline, and a small training set rendered from the real VSP data."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny default, created by the same function as `mirage-rl create-model`."""
    from mirage_rl.modeling import create_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    create_tiny_model(out, latent_size=4, seed=0)
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
    from mirage_rl.data.build import BuildDataArguments, build_vsp_dataset

    out = tmp_path_factory.mktemp("data") / "vsp"
    build_vsp_dataset(BuildDataArguments(output_dir=str(out), train_jsonl=str(vsp_dir / "mirage_train_maps.jsonl"),
                                         test_dir=str(vsp_dir / "maze_planning"), max_train_maps=24,
                                         num_generated=8, seed=1))
    return out


@pytest.fixture(scope="session")
def small_rows(small_dataset_dir):
    from datasets import load_from_disk

    return load_from_disk(str(small_dataset_dir))["train"]
