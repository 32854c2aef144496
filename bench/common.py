"""What the benchmark scripts share: the VSP rows, the model at a given ``--size``, timing summaries, the JSON report.

Sizes: ``tiny`` is the offline default (``mirage_rl.tiny.create_tiny_model``, fp32, CPU). ``3b`` and ``7b`` are
Qwen2.5-VL-3B/7B-shaped configs, ``8b`` a Qwen3-VL-8B-shaped one (text model, embedding and vision tower at the
released sizes) with random weights, built in bf16 directly on the device, with the tiny offline tokenizer and
processor of the same family (no hub access): timings of the real shapes without the real weights. They need a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIRAGE_SHARED_DATA", REPO.parent / "shared" / "data"))

# Qwen2.5-VL-3B/7B-Instruct and Qwen3-VL-8B-Instruct config.json values (text model, vocabulary rows and vision tower)
# and the parameter counts they give (tests/test_bench.py checks them; 3b/7b: the released counts; 8b: 8,767,123,696,
# the 8.77 B of the model card).
SHAPES = {
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
               vision_out=2048, parameters=3_754_622_976),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
               vision_out=3584, parameters=8_292_166_656),
    "8b": dict(backbone="qwen3_vl",
               text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, vocab_size=151936),
               vision_out=4096, parameters=8_767_123_696),
}
SIZES = ("tiny", *SHAPES)


def size_backbone(size: str) -> str:
    """The model family of ``size`` (``8b``: qwen3_vl; the others qwen2_5_vl; ``tiny``: the default)."""
    return SHAPES.get(size, {}).get("backbone", "qwen2_5_vl")


def shaped_config(size: str, tiny_config):
    """The config of ``size`` (``3b``/``7b``: ``Qwen2_5_VLConfig``; ``8b``: ``Qwen3VLConfig``), keeping the
    special-token ids of ``tiny_config`` (the tokenizer in use). Raises ValueError for an unknown size."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    if size not in SHAPES:
        raise ValueError(f"--size {size!r}: choose one of {SIZES}")
    shape = SHAPES[size]
    tiny_text = tiny_config.get_text_config()
    common = dict(max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=None,
                  eos_token_id=tiny_text.eos_token_id, pad_token_id=tiny_text.pad_token_id)
    if size_backbone(size) == "qwen3_vl":  # Qwen3-VL-8B-Instruct
        cls = Qwen3VLConfig
        text = dict(shape["text"], **common, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                              "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                      out_hidden_size=shape["vision_out"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                      hidden_act="gelu_pytorch_tanh", in_channels=3)
    else:
        cls = Qwen2_5_VLConfig
        text = dict(shape["text"], **common,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      out_hidden_size=shape["vision_out"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_chans=3)
    ids = {k: getattr(tiny_config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                "vision_end_token_id")}
    config = cls(text_config=text, vision_config=vision, tie_word_embeddings=shape["text"]["tie_word_embeddings"],
                 **ids)
    for key in ("latent_size", "latent_token_ids", "latent_mode"):
        if hasattr(tiny_config, key):
            setattr(config, key, getattr(tiny_config, key))
    config.eos_token_id, config.pad_token_id = tiny_text.eos_token_id, tiny_text.pad_token_id
    return config


def bench_model_dir(size: str, latent_size: int | None, work: Path, backbone: str | None = None) -> Path:
    """Create the tiny checkpoint (tokenizer, processor, latent tokens) of ``size``'s family (or ``backbone``) for
    ``latent_size`` under ``work``; every size starts from it. Returns its folder."""
    from mirage_rl.tiny import create_tiny_model

    backbone = backbone or size_backbone(size)
    out = work / (f"tiny_k{latent_size}" if backbone == "qwen2_5_vl" else f"tiny_{backbone}_k{latent_size}")
    if not (out / "config.json").exists():
        create_tiny_model(out, latent_size=latent_size, seed=0, backbone=backbone)
    return out


def load_bench_model(size: str, model_dir: Path, device: str):
    """``(model, processor)`` at ``size``: the tiny checkpoint as saved (fp32; bf16 on CUDA), or a ``3b``/``7b``-shaped
    model with random weights built in bf16 on ``device`` (vision tower frozen, as ``load_model`` does)."""
    from transformers import AutoConfig, GenerationConfig

    from mirage_rl import backbones
    from mirage_rl.modeling import load_model, load_processor

    processor = load_processor(model_dir)
    if size == "tiny":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        return load_model(model_dir, dtype=dtype).to(device), processor
    if not device.startswith("cuda"):
        sys.exit(f"--size {size}: a {size}-shaped model needs a GPU (run with --device cuda on a GPU machine)")
    config = shaped_config(size, AutoConfig.from_pretrained(model_dir))  # only the tiny ids and tokens are reused
    torch.manual_seed(0)
    with torch.device(device):
        model = backbones.get(config.model_type).model_class._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.model.visual.requires_grad_(False)
    return model, processor


def build_rows(n: int, out: Path, script: str):
    """The first ``n`` Mirage VSP training rows (``mirage_rl.data.build``), built under ``out`` from the shared data.
    Exits with a message naming ``MIRAGE_SHARED_DATA`` when the data is not there."""
    from datasets import load_from_disk

    from mirage_rl.data.build import BuildDataArguments, build_task_dataset

    vsp = SHARED_DATA / "vsp"
    if not vsp.exists():
        sys.exit(f"{script}: the VSP data is not at {vsp}; set MIRAGE_SHARED_DATA to the shared/data folder")
    build_task_dataset(BuildDataArguments(output_dir=str(out), train_jsonl=str(vsp / "mirage_train_maps.jsonl"),
                                         test_dir=str(vsp / "maze_planning"), max_train_maps=n, num_generated=0,
                                         seed=0))
    return load_from_disk(str(out))["train"]


def prepare_for_steps(trainer) -> None:
    """What ``Trainer.train`` does before its loop, for scripts that call ``training_step`` themselves: turn gradient
    checkpointing on when the config asks for it (a trainer's ``__init__`` does not), create the optimizer, set one
    accumulation step (the loss reads it) and let accelerate wrap model and optimizer."""
    if trainer.args.gradient_checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model_wrapped = trainer.model = trainer.accelerator.prepare(trainer.model)
    trainer.optimizer = trainer.accelerator.prepare(trainer.optimizer)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    """CUDA: ``max_memory_allocated``; CPU: the process's peak RSS (it only grows), in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use_mb() -> float:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``: in-use heap chunks of every arena plus
    mmapped chunks), in MiB. Torch's CPU tensors are allocated through malloc, so this is their live memory."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mb``: the peak of live memory inside the block above its
    level at entry, in MiB. CUDA: ``max_memory_allocated``. CPU: :func:`heap_in_use_mb` sampled every
    ``period_s`` by a thread (torch ops release the GIL, so the sampler runs during forward and backward); a peak
    shorter than the period can be missed, so repeat the block for a stable figure."""

    def __init__(self, device: str, period_s: float = 0.0005):
        self.device, self.period_s, self.mb = device, period_s, 0.0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
            return self
        self._base, self._peak, self._stop = heap_in_use_mb(), 0.0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, heap_in_use_mb())
                time.sleep(self.period_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20 - self._base
            return False
        self._stop.set()
        self._thread.join()
        self.mb = max(self._peak, heap_in_use_mb()) - self._base
        return False


def summary(times: list[float]) -> dict:
    """Median and quartiles (seconds) of timed repeats."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "n": len(times)}


def header(bench: str, size: str, device: str) -> dict:
    """The fields every report starts with: what ran where and when."""
    return {"bench": bench, "size": size, "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
            "machine": platform.node(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def run(main) -> None:
    """Run ``main() -> dict`` with stdout sent to stderr (libraries such as deepspeed's accelerator probe print to
    stdout), then print its report as the one JSON object on stdout."""
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        report = main()
    print(json.dumps(report, indent=1), file=stdout)
