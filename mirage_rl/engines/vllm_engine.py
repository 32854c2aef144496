"""The vLLM rollout engine (issue 30): latent decoding on vLLM's V1 model runner (:mod:`.vllm_runner`).

``VLLMEngine.load(path)`` starts ``vllm.LLM`` on a checkpoint with the latent worker (``worker_cls``), eager mode,
prefix caching off for latent decoding (:mod:`.vllm_runner`), in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
``VLLMEngine(llm, ...)`` wraps an ``LLM`` someone else built with :func:`latent_llm_options` (GRPO colocate: TRL's).
:meth:`VLLMEngine.rollout` sends each row as one request (:meth:`VLLMEngine.prompts`: its unpadded prompt ids and
its images' features) with the latent settings in ``SamplingParams.extra_args`` and returns the HF engine's
:class:`~mirage_rl.generation.GenerationOutput`.

Not supported (refused in one line): ``latent_fn`` (the latent interventions of
:data:`mirage_rl.engines.HF_ONLY_INTERVENTIONS`: they index rows of the HF loop's batch), sampling without per-row
seeds.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import torch

from .. import backbones
from ..data.jsonl import read_json
from ..generation import GenerationOutput
from ..modeling import PROCESSOR_CONFIG, VIDEO_PROCESSOR_CONFIG, LatentTokens
from . import HF_ONLY_INTERVENTIONS, DecodeSettings, RolloutBatch, RolloutEngine, require_vllm

WORKER = {"cpu": "mirage_rl.engines.vllm_runner.LatentCPUWorker",
          "cuda": "mirage_rl.engines.vllm_runner.LatentGPUWorker"}
#: the families vLLM serves with the latent runner (every backbone), and their stock processors
VLLM_MODEL_TYPES = backbones.NAMES
STOCK_PROCESSORS = tuple(b.stock_processor for b in backbones.BACKBONES.values())
MIN_CPU_HEAD_DIM = 32  # vLLM's CPU attention (v1/attention/backends/cpu_attn.py)

logger = logging.getLogger(__name__)


def checkpoint_problem(path: str | Path, device: str = "cpu") -> str | None:
    """Why vLLM cannot load the checkpoint folder ``path`` (one line), or None. Checks: a full model (not a LoRA
    adapter folder), a Qwen2.5-VL or Qwen3-VL config, a stock ``processor_class`` and ``video_preprocessor_config.json`` (vLLM
    builds the stock processor), and on CPU a head dimension of at least 32."""
    folder = Path(path)
    if not folder.is_dir():
        return None  # a hub id: vLLM resolves it
    if (folder / "adapter_config.json").is_file():
        return (f"{folder} is a LoRA adapter folder: merge it into a full checkpoint first (mirage-rl export "
                f"--adapter_dir {folder} --output_dir DIR)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        return f"{folder} has no config.json"
    config = read_json(config_file)
    if config.get("model_type") not in VLLM_MODEL_TYPES:
        return (f"{config_file}: model_type {config.get('model_type')!r}; the vLLM engine runs "
                f"{', '.join(VLLM_MODEL_TYPES)}")
    proc = folder / PROCESSOR_CONFIG
    cls = read_json(proc).get("processor_class") if proc.is_file() else None
    if cls is not None and cls not in STOCK_PROCESSORS:
        return (f"{proc}: processor_class {cls!r} is not a stock class, which vLLM needs; re-save the processor with "
                f"this mirage-rl (its save_pretrained writes the stock class)")
    if not (folder / VIDEO_PROCESSOR_CONFIG).is_file():
        return (f"{folder} has no {VIDEO_PROCESSOR_CONFIG}, which vLLM's stock processor reads; re-save the "
                f"processor with this mirage-rl (its save_pretrained writes it)")
    text = config.get("text_config", config)
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    head_dim = text.get("head_dim") or (hidden // heads if heads and hidden else None)
    if device == "cpu" and head_dim is not None and head_dim < MIN_CPU_HEAD_DIM:
        return (f"{config_file}: head dimension {head_dim} < {MIN_CPU_HEAD_DIM}, which vLLM's CPU attention needs; "
                f"use a model with hidden_size / num_attention_heads >= {MIN_CPU_HEAD_DIM}")
    return None


def prepare_environment() -> None:
    """Before a latent ``vllm.LLM`` starts: the V1 model runner (vLLM 0.31 picks V2 on GPUs with Triton; the latent
    runner subclasses V1) and the engine core in this process (unless the caller set either)."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def vllm_device() -> str:
    """``cuda`` where torch sees a GPU, else ``cpu``: the device vLLM runs on, which picks the worker and the checks."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def latent_llm_options(latent: bool, dtype: str) -> dict:
    """The ``vllm.LLM`` arguments every latent engine needs, whoever builds it (:meth:`VLLMEngine.load`, GRPO's
    colocated ``LLM``): the latent worker of :func:`vllm_device`, eager mode, image embeddings as inputs (the engine
    feeds the policy's own image features), the policy's ``dtype`` (vLLM's ``auto`` turns a float32 checkpoint into
    16-bit weights: 5e-3 nats of drift measured against the trainer) and prefix caching off for latent decoding (KV
    after a latent slot depends on the latent, which vLLM's token-id block hash cannot see)."""
    return dict(worker_cls=WORKER[vllm_device()], enforce_eager=True, enable_mm_embeds=True,
                enable_prefix_caching=not latent, dtype=dtype)


def llm_kwargs(model_path: str, latent: bool, dtype: str = "float32", seed: int = 0,
               max_model_len: int | None = None, max_num_seqs: int = 256, images_per_prompt: int = 4) -> dict:
    """``vllm.LLM`` arguments of :meth:`VLLMEngine.load`: :func:`latent_llm_options` and the engine's own."""
    kw = dict(model=model_path, seed=seed, max_num_seqs=max_num_seqs,
              limit_mm_per_prompt={"image": images_per_prompt, "video": 0}, **latent_llm_options(latent, dtype))
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    return kw


def stack_logprobs(rows: list[list[float]], width: int) -> torch.Tensor:
    """Per-row log-prob lists -> ``(B, width)`` float32, 0.0 past a row's end."""
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[:width], dtype=torch.float32)
    return out


def collapse_image_tokens(ids: list[int], image_token: int | None) -> list[int]:
    """``ids`` with each run of image tokens cut to one: vLLM expands one ``<|image_pad|>`` per image itself (from the
    image's grid), and a prompt already expanded would be expanded again."""
    if image_token is None:
        return ids
    return [t for j, t in enumerate(ids) if t != image_token or j == 0 or ids[j - 1] != image_token]


class VLLMEngine(RolloutEngine):
    """Latent rollouts on vLLM (module docstring). ``llm``: a ``vllm.LLM`` built with the latent worker;
    ``processor``: the checkpoint's processor (its tokenizer decodes the texts); ``latent_tokens``: the checkpoint's
    :class:`~mirage_rl.modeling.LatentTokens` (None: a checkpoint without them, ``latent_mode: none`` only)."""

    name = "vllm"

    def __init__(self, llm, processor, latent_tokens: LatentTokens | None, image_features=None, owns: bool = False):
        self.llm, self.processor, self.latent_tokens, self.owns = llm, processor, latent_tokens, owns
        self.image_features = image_features
        self._said_fused = False

    @classmethod
    def load(cls, model_path: str | Path, processor, latent_tokens: LatentTokens | None, image_features=None,
             latent: bool = True,
             dtype: str = "float32", seed: int = 0, max_model_len: int | None = None, max_num_seqs: int = 256,
             images_per_prompt: int = 4, option: str = "--engine vllm", **llm_options) -> "VLLMEngine":
        """Start vLLM on ``model_path`` in this process; ``llm_options`` go to ``vllm.LLM`` as they are (e.g.
        ``max_num_batched_tokens``, ``num_gpu_blocks_override``).

        Raises:
            ImportError: vLLM is not installed (names the extra).
            ValueError: a checkpoint vLLM cannot load (:func:`checkpoint_problem`, one line).
        """
        require_vllm(option)
        why = checkpoint_problem(model_path, vllm_device())
        if why is not None:
            raise ValueError(f"{option}: vLLM cannot load the checkpoint: {why}")
        prepare_environment()
        from vllm import LLM

        from .vllm_runner import check_version

        check_version()
        kwargs = llm_kwargs(str(model_path), latent, dtype, seed, max_model_len, max_num_seqs, images_per_prompt)
        llm = LLM(**{**kwargs, **llm_options})
        return cls(llm, processor, latent_tokens, image_features, owns=True)

    def rollout(self, batch: RolloutBatch, settings: DecodeSettings) -> GenerationOutput:
        from vllm import SamplingParams

        from .vllm_runner import request_args

        if settings.latent_fn is not None:
            raise ValueError(f"the vLLM engine does not run latent_fn (the latent interventions "
                             f"{', '.join(HF_ONLY_INTERVENTIONS)}): use --engine hf for them")
        if settings.do_sample and settings.seeds is None:
            raise ValueError("the vLLM engine samples with one seed per row: pass DecodeSettings.seeds")
        if settings.fused_steps != "off" and not self._said_fused:
            self._said_fused = True
            logger.info("latent_fused_steps: %s fuses the HF engine's decoding steps and the training fill; the vLLM "
                        "engine decodes with its own model runner (eager)", settings.fused_steps)
        tok = self.processor.tokenizer
        am = batch.tensors["attention_mask"].cpu().bool()
        B = am.shape[0]
        tokens = self.latent_tokens if settings.latent_mode != "none" else None
        if settings.latent_mode != "none" and tokens is None:
            raise ValueError(f"latent_mode {settings.latent_mode!r} needs a checkpoint with latent tokens")
        longest, limit = int(am.sum(1).max()), self.llm.llm_engine.model_config.max_model_len
        if longest + settings.max_new_tokens > limit:
            raise ValueError(f"{settings.length_option}={settings.max_new_tokens}: the longest prompt ({longest} "
                             f"tokens) plus the new tokens exceed vLLM's max_model_len {limit}; lower "
                             f"{settings.length_option} or start vLLM with a larger max_model_len "
                             "(GRPO: vllm_max_model_length)")
        eos = sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id, *settings.eos_token_ids})
        prompts, params, uids = self.prompts(batch), [], []
        run = uuid.uuid4().hex[:12]
        for i in range(B):
            uid = f"{run}-{i}"
            uids.append(uid)
            extra = request_args(uid, settings.latent_mode, tokens,
                                 seed=settings.seeds[i] if settings.seeds is not None else None,
                                 do_sample=settings.do_sample, temperature=settings.temperature, top_p=settings.top_p,
                                 latent_sigma=settings.latent_sigma, suppress_token_ids=settings.suppress_token_ids,
                                 return_logprobs=settings.return_logprobs, record_latents=settings.record_latents)
            params.append(SamplingParams(max_tokens=settings.max_new_tokens, temperature=1.0, stop_token_ids=eos,
                                         detokenize=False, extra_args=extra))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        records = self.llm.collective_rpc("mirage_collect", args=(uids,))[0]
        completions = [list(o.outputs[0].token_ids) for o in outputs]
        width = max([len(c) for c in completions] + [0])
        seqs = torch.full((B, width), tok.pad_token_id, dtype=torch.long)
        for i, c in enumerate(completions):
            seqs[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        missing = [u for u in uids if u not in records]
        if missing:
            raise RuntimeError(f"vLLM returned no latent record for {len(missing)} of {B} requests (internal error)")
        logprobs = (stack_logprobs([records[u]["logprobs"] for u in uids], width)
                    if settings.return_logprobs else None)
        latents = None
        if settings.latent_sigma is not None:
            H = self.hidden_size()
            latents = torch.zeros(B, width, H)
            for i, u in enumerate(uids):
                for t, vec in records[u]["gaussian"]:
                    if t < width:
                        latents[i, t] = vec
        texts = []
        for c in completions:
            cut = next((j for j, t in enumerate(c) if t in eos), len(c))
            texts.append(tok.decode(c[:cut], skip_special_tokens=False))
        own = fed = None
        if settings.record_latents:
            H = self.hidden_size()
            own = [records[u]["own"] if records[u]["own"] is not None else torch.zeros(0, H) for u in uids]
            fed = [records[u]["fed"] if records[u]["fed"] is not None else torch.zeros(0, H) for u in uids]
        return GenerationOutput(seqs, texts, logprobs, latents, own, fed)

    def prompts(self, batch: RolloutBatch) -> list[dict]:
        """vLLM's prompt of each row: its unpadded ids, each run of image tokens cut to one
        (:func:`collapse_image_tokens`), and its images' features (:meth:`_row_image_features`)."""
        ids, am = batch.tensors["input_ids"].cpu(), batch.tensors["attention_mask"].cpu().bool()
        image_token = getattr(self.llm.llm_engine.model_config.hf_config, "image_token_id", None)
        out = []
        for i, features in enumerate(self._row_image_features(batch)):
            row = {"prompt_token_ids": collapse_image_tokens(ids[i][am[i]].tolist(), image_token)}
            if features is not None:
                row["multi_modal_data"] = {"image": features}
            out.append(row)
        return out

    def _row_image_features(self, batch: RolloutBatch) -> list:
        """Per row, vLLM's image-embedding input (``{"image_embeds": (n, H'), "image_grid_thw": (m, 3)}``) or None.

        The features come from ``image_features`` (the policy's own vision tower through
        :func:`mirage_rl.latent.image_embeds`: the merged visual tokens, ``H' = H``, and on Qwen3-VL its DeepStack
        features after them, ``H' = H * (1 + D)``, as vLLM's Qwen3-VL takes them) on the batch's ``pixel_values``: the pixels and features the HF engine
        and the trainer's scoring use. vLLM's own vision path is not used: its image processor resizes with torchvision
        (other pixels than the collator's PIL path) and its vision tower gave features 0.3 apart from transformers' on
        the tiny model (measured; a real difference on that config, whatever its cause), which breaks parity."""
        t = batch.tensors
        B = t["input_ids"].shape[0]
        if t.get("pixel_values") is None:
            return [None] * B
        if self.image_features is None:
            raise ValueError("the vLLM engine needs image_features (the policy's vision tower) for image prompts")
        grid = t["image_grid_thw"].cpu()
        with torch.no_grad():
            feats = [f.detach().float().cpu() for f in self.image_features(t["pixel_values"], t["image_grid_thw"])]
        mm = t.get("mm_token_type_ids")
        if mm is None:
            raise ValueError("image prompts need mm_token_type_ids (which tokens are image tokens)")
        tokens = ((mm.cpu() == 1) & t["attention_mask"].cpu().bool()).sum(1).tolist()
        out, j = [], 0
        for i in range(B):  # rows hold their images in order: consume features until the row's image tokens are met
            first, left = j, tokens[i]
            while left > 0 and j < len(feats):
                left -= feats[j].shape[0]
                j += 1
            if left != 0:
                raise ValueError(f"row {i}: its image tokens do not match its images' features (a truncated prompt?)")
            out.append({"image_embeds": torch.cat(feats[first:j], 0), "image_grid_thw": grid[first:j]}
                       if j > first else None)
        return out

    def hidden_size(self) -> int:
        """The decoder's hidden size (the width of a latent)."""
        config = self.llm.llm_engine.model_config.hf_config
        return getattr(getattr(config, "text_config", config), "hidden_size")

    def close(self) -> None:
        if self.owns and self.llm is not None:
            import gc

            del self.llm
            self.llm = None
            gc.collect()
