"""Models, processors and the latent tokens: the one place that knows their ids.

* :class:`LatentTokens` reads the ids of ``<|latent_start|>``, ``<|latent_pad|>``, ``<|latent_end|>``
  from ``model.config.latent_token_ids``; no id is hard-coded anywhere in the project.
* :func:`add_latent_tokens` adds the three tokens to any supported checkpoint (tiny, 7B or 8B) if they
  are missing, resizes the embeddings and records ids and latent size in the config.
* :func:`load_model` / :func:`load_processor` load checkpoints (local folders, hub ids, LoRA adapter folders merged
  into their base: :func:`load_adapter_model`, :func:`export_merged`). The tiny offline model is built by
  :mod:`mirage_rl.tiny`.

The family's stock ``*ForConditionalGeneration`` class is used everywhere, chosen from the checkpoint's
``model_type`` (:mod:`mirage_rl.backbones`; a subclass would not reload its weights in transformers 5: checkpoint keys
are renamed by class name).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import backbones
from .atomic import atomic_directory, recover_directory
from .lora import ADAPTER_CONFIG, ADAPTER_INFO, is_adapter_dir
from .tokens import LATENT_END, LATENT_PAD, LATENT_START, LATENT_TOKENS  # noqa: F401 (the names modeling exports)
from .backbones.base import PROCESSOR_CONFIG, QWEN_CHAT_TEMPLATE, VIDEO_PROCESSOR_CONFIG  # noqa: F401
from .backbones.qwen2_5_vl import MirageProcessor  # noqa: F401 (Qwen2.5-VL's; every family's: mirage_rl.backbones)
from .data.jsonl import read_json

logger = logging.getLogger(__name__)

#: the tiny models' chat template (the name earlier releases exported)
QWEN2_5_VL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE


@dataclass(frozen=True)
class LatentTokens:
    """Ids of the three latent tokens and the latent size k, as stored in a model's config."""

    start: int
    pad: int
    end: int
    latent_size: int

    @classmethod
    def from_config(cls, config, where: str = "model") -> "LatentTokens":
        """Read ``config.latent_token_ids`` and ``config.latent_size``.

        Raises:
            ValueError: if the checkpoint has no latent tokens (run ``mirage-rl create-model`` or stage 1
                on it first).
        """
        ids = getattr(config, "latent_token_ids", None)
        size = getattr(config, "latent_size", None)
        if not ids or size is None:
            raise ValueError(
                f"{where}: the checkpoint has no latent tokens (config.latent_token_ids/latent_size missing). "
                "Start from `mirage-rl create-model` or a stage-1 output, or call `add_latent_tokens`."
            )
        return cls(int(ids["start"]), int(ids["pad"]), int(ids["end"]), int(size))

    @classmethod
    def for_model(cls, model, processor, where: str = "model") -> "LatentTokens":
        """:meth:`from_config`, then check that the processor's tokenizer maps the three latent token strings to
        the same ids (a config copied onto another tokenizer would silently train the wrong rows).

        Raises:
            ValueError: no latent tokens in the config, or a tokenizer that disagrees (naming the ids).
        """
        tokens = cls.from_config(model.config, where=where)
        if processor is not None:
            vocab = processor.tokenizer.get_vocab()
            have = {name: vocab.get(t) for name, t in zip(("start", "pad", "end"), LATENT_TOKENS)}
            want = {"start": tokens.start, "pad": tokens.pad, "end": tokens.end}
            if have != want:
                raise ValueError(f"{where}: config.latent_token_ids {want} but the tokenizer maps the latent tokens to "
                                 f"{have}; save model and processor together (mirage_rl.modeling.save_pretrained)")
        return tokens

    def block(self) -> str:
        """The latent block as text: start, k pads, end."""
        return LATENT_START + LATENT_PAD * self.latent_size + LATENT_END


def add_latent_tokens(model, processor, latent_size: int) -> LatentTokens:
    """Add the latent tokens to ``processor.tokenizer`` if missing, resize ``model``'s embeddings when the vocabulary
    outgrows them, and record ids and ``latent_size`` in ``model.config``.

    The rows of tokens added here and the rows a resize creates (input embedding and LM head) are set to the mean of the
    rows before them, also when no resize is needed (Qwen2.5-VL-7B's embedding has spare rows past its tokenizer). Works on a model loaded
    sharded under DeepSpeed ZeRO-3 (the rows are gathered, written on rank 0 and re-partitioned); call it on every
    rank then. Raises ``ValueError`` if the checkpoint already records a different latent size.
    """
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    old = getattr(model.config, "latent_size", None)
    if old is not None and old != latent_size:
        raise ValueError(f"the checkpoint was trained with latent_size={old}, the recipe asks for {latent_size}; "
                         "use the checkpoint's value or start from a checkpoint without latent tokens")
    tok = processor.tokenizer
    missing = [t for t in LATENT_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in zip(("start", "pad", "end"), LATENT_TOKENS)}
    weight = model.get_input_embeddings().weight
    old_rows = getattr(weight, "ds_shape", weight.shape)[0]
    new_rows = set(range(old_rows, len(tok))) | {tok.convert_tokens_to_ids(t) for t in missing}
    if old_rows < len(tok):
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if new_rows:
        _init_rows_to_mean(model, sorted(new_rows))
    model.config.latent_token_ids = ids
    model.config.latent_size = int(latent_size)
    return LatentTokens(ids["start"], ids["pad"], ids["end"], int(latent_size))


def _init_rows_to_mean(model, rows: list[int]) -> None:
    """Set embedding/LM-head ``rows`` to the mean of the rows before the first of them (gathered under ZeRO-3)."""
    from contextlib import nullcontext

    from transformers.integrations import is_deepspeed_zero3_enabled

    layers = list({id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values())
    gather = nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([m.weight for m in layers], modifier_rank=0)
    with gather, torch.no_grad():
        for layer in layers:
            layer.weight[rows] = layer.weight[: rows[0]].mean(0, keepdim=True).to(layer.weight.dtype)


#: an ``org/name`` model id on the Hugging Face hub (anything else that does not exist locally is a local mistake)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_PROBE_TIMEOUT_S = 3.0
_hub_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (``huggingface_hub.constants.ENDPOINT``) opens within
    ``timeout`` seconds (False under ``HF_HUB_OFFLINE``); asked once per process."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = constants.ENDPOINT
    if endpoint not in _hub_reachable:
        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            _hub_reachable[endpoint] = True
        except OSError:
            _hub_reachable[endpoint] = False
    return _hub_reachable[endpoint]


def check_source(path: str | Path, what: str = "model") -> dict:
    """Decide, before any download is tried, where ``path`` comes from; returns extra ``from_pretrained`` kwargs.

    A local folder is used as it is. A path that does not exist and is not an ``org/name`` id is a local mistake
    (e.g. stage 2 started before stage 1 wrote its folder). An ``org/name`` id is loaded from the hub, or from the
    local cache (``local_files_only``) when the hub cannot be reached.

    Raises:
        FileNotFoundError: ``path`` is a file; or does not exist and is not an ``org/name`` id; or is an id that is
            neither cached nor reachable within :data:`HUB_PROBE_TIMEOUT_S` seconds (not available offline).
    """
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"{what} {path} is a file; a {what} is a folder (a stage's output_dir or "
                                    "`mirage-rl create-model`)")
        return {}
    name = str(path)
    if not HUB_ID.match(name):
        raise FileNotFoundError(f"{what} {path} does not exist (and is not an org/name hub id); did the stage that "
                                "writes it finish? Stage 2 starts from stage 1's output_dir, GRPO from stage 2's")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if hub_reachable():
        return {}
    if cached:
        logger.info("%s: the hub cannot be reached; loading %s from the local cache", what, name)
        return {"local_files_only": True}
    raise FileNotFoundError(f"{what} {path}: no such local folder, and the hub id {name} is not available offline (not "
                            f"in the local cache, and {constants.ENDPOINT} cannot be reached"
                            f"{' under HF_HUB_OFFLINE' if constants.HF_HUB_OFFLINE else ''}); download it where the "
                            f"hub is reachable (`hf download {name}`) or pass a local folder")


def check_safetensors(path: str | Path) -> None:
    """Check that a ``.safetensors`` file is whole: its header parses and its size is the header's length plus the
    end of the last tensor (a truncated copy or an interrupted write fails here, naming the file).

    Raises:
        ValueError: naming the file, what is wrong and what to do.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "copy it again or save the model again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: not a complete safetensors file ({size} bytes, header length "
                             f"{n if n >= 0 else 'missing'}); the file is truncated or corrupted: {fix}")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path}: its safetensors header is not valid; the file is corrupted: {fix}") from None
    if 8 + n + end != size:
        raise ValueError(f"{path}: truncated or corrupted safetensors file ({size} bytes, its header describes "
                         f"{8 + n + end}): {fix}")


def check_not_interrupted(folder: str | Path) -> None:
    """Raise ``FileNotFoundError`` naming the interrupted run and how to resume it when ``folder`` holds a run's
    checkpoints but no finished model (:func:`mirage_rl.outputs.interrupted_run_message`)."""
    from .outputs import interrupted_run_message

    folder = Path(folder)
    if (folder / "config.json").is_file() or (folder / ADAPTER_CONFIG).is_file():
        return
    message = interrupted_run_message(folder)
    if message:
        raise FileNotFoundError(message)


def check_processor_files(folder: str | Path) -> None:
    """Raise ``FileNotFoundError`` when a local model folder lacks the tokenizer or image-processor files (without
    them transformers loads an empty tokenizer, and the error later blames the latent token ids)."""
    folder = Path(folder)
    check_not_interrupted(folder)
    missing = []
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise FileNotFoundError(f"tokenizer files missing in {folder}: {missing}; save the processor with the model "
                                "(processor.save_pretrained(folder)) or copy those files from the model it came from")
    if not any((folder / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        raise FileNotFoundError(f"image processor files missing in {folder}: no processor_config.json or "
                                "preprocessor_config.json; save the processor with the model")
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json", "processor_config.json",
                 "preprocessor_config.json"):
        if (folder / name).is_file():
            read_json(folder / name)  # ValueError naming a damaged file


def checkpoint_backbone(path: str | Path, extra: dict | None = None) -> "backbones.Backbone":
    """The family of the checkpoint at ``path`` (a local folder with a ``config.json``, an adapter folder: its base's,
    or a hub id: its config, downloaded or cached), :data:`mirage_rl.backbones.DEFAULT` for a local folder without
    ``config.json`` (a processor-only folder).

    Raises:
        ValueError: a checkpoint of an unsupported family (:func:`check_model_type`)."""
    local = Path(path)
    if local.is_dir():
        if is_adapter_dir(local):
            base = read_json(local / ADAPTER_CONFIG).get("base_model_name_or_path")
            return checkpoint_backbone(base, check_source(base, "model")) if base else backbones.get(backbones.DEFAULT)
        if not (local / "config.json").is_file():
            return backbones.get(backbones.DEFAULT)
        return check_model_type(read_json(local / "config.json"), str(local / "config.json"))
    from transformers import PretrainedConfig

    return check_model_type(PretrainedConfig.get_config_dict(str(path), **(extra or {}))[0], f"{path} (config.json)")


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """Load the processor (tokenizer + image processor) of a checkpoint's family (:func:`checkpoint_backbone`) from
    a folder or hub id; code shipped with the checkpoint runs only with ``trust_remote_code=True``.

    Raises:
        FileNotFoundError: a missing path or unreachable hub id (:func:`check_source`), or a local folder without
            tokenizer / image-processor files (:func:`check_processor_files`).
        ValueError: a checkpoint of an unsupported family.
    """
    extra = check_source(path, "model")
    local = Path(path)
    if local.is_dir():
        recover_directory(local)
        check_processor_files(local)
    family = checkpoint_backbone(path, extra)
    return family.processor_class.from_pretrained(str(path), trust_remote_code=trust_remote_code, **extra)


#: the checkpoints' ``model_type`` values mirage-rl trains and decodes (:mod:`mirage_rl.backbones`)
SUPPORTED_MODEL_TYPES = backbones.NAMES


def check_model_type(config: dict, where: str) -> "backbones.Backbone":
    """The family of a checkpoint's ``config.json`` contents, or a refusal before ``from_pretrained`` would load another
    family into the wrong classes (transformers only warns there, then runs with mismatched or fresh weights).

    Raises:
        ValueError: ``config["model_type"]`` is not in :data:`SUPPORTED_MODEL_TYPES`, naming it, ``where`` and what is
            supported (a Qwen3.5 checkpoint, say)."""
    return backbones.get(config.get("model_type"), where)


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """Load the family's ``*ForConditionalGeneration`` (:mod:`mirage_rl.backbones`, from the checkpoint's
    ``model_type``; safetensors only) and freeze its vision tower. A LoRA adapter
    folder (a stage trained with ``use_peft: true``) loads as its base with the adapter merged
    (:func:`load_adapter_model`).

    Raises:
        FileNotFoundError: a local folder without ``config.json`` or without ``*.safetensors`` weights (pickled
            ``.bin`` weights are refused: loading them can run code); a path that does not exist, or a hub id not
            available offline (:func:`check_source`).
        ValueError: a truncated or corrupted ``*.safetensors`` file (:func:`check_safetensors`); a checkpoint of
            another model family (:func:`check_model_type`).
    """
    extra = check_source(path, "model")
    local = Path(path)
    if local.exists():
        recover_directory(local)
        if is_adapter_dir(local):  # a stage trained with use_peft: base + adapter, merged
            return load_adapter_model(local, dtype=dtype, trust_remote_code=trust_remote_code,
                                      attn_implementation=attn_implementation)
        check_not_interrupted(local)
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; not a saved model folder (a stage's output_dir, or "
                                    "`mirage-rl create-model`)")
        family = check_model_type(read_json(local / "config.json"), str(local / "config.json"))  # (damaged: named)
        if not any(local.glob("*.safetensors")):
            pickled = sorted(p.name for p in local.glob("*.bin"))
            raise FileNotFoundError(f"{path}: no *.safetensors weights{f' (only pickled {pickled})' if pickled else ''}; "
                                    "mirage-rl loads safetensors only: convert the checkpoint with "
                                    "save_pretrained(safe_serialization=True)")
        for weights in sorted(local.glob("*.safetensors")):
            check_safetensors(weights)
    else:  # a hub id: its config (downloaded or cached) before its weights
        from transformers import PretrainedConfig

        family = check_model_type(PretrainedConfig.get_config_dict(str(path), **extra)[0], f"{path} (config.json)")
    model_class = family.model_class  # the family's stock class
    model = model_class.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation, **extra,
    )
    freeze_vision_tower(model)
    return model


def freeze_vision_tower(model) -> None:
    """Freeze the vision encoder and merger (Mirage keeps the vision tower frozen in every stage)."""
    for p in model.model.visual.parameters():
        p.requires_grad_(False)


def save_pretrained(model, processor, output_dir: str | Path, command: str = "save_pretrained") -> None:
    """Save model (safetensors) and processor to ``output_dir`` atomically (temp folder + rename); only the files an
    earlier model save wrote there are replaced, everything else in ``output_dir`` (``checkpoint-*``, ``eval/``, a
    user's files) is kept (:func:`mirage_rl.atomic.commit_directory`)."""
    with atomic_directory(output_dir, "model", command=command) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)


def load_adapter_model(path, dtype, trust_remote_code: bool = False, attn_implementation: str | None = None):
    """Base model + the adapter in ``path``, merged: a plain ``*ForConditionalGeneration`` of the base's family whose
    ``name_or_path`` is ``path`` (so that an adapter trained on top records ``path`` as its base).

    The base (``adapter_config.json``'s ``base_model_name_or_path``) may itself be an adapter folder: it is loaded the
    same way first. The latent tokens are added to the base as the adapter's processor and ``mirage_adapter.json``
    describe them, then the adapter's rows overwrite them.

    Raises:
        FileNotFoundError: the base model named in ``adapter_config.json`` cannot be found (says how to fix it).
        ValueError: the adapter's processor and ``mirage_adapter.json`` disagree on the latent tokens.
    """
    from peft import PeftModel

    path = Path(path)
    cfg = read_json(path / ADAPTER_CONFIG)
    base_path = cfg.get("base_model_name_or_path")
    if not base_path:
        raise FileNotFoundError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path; set it to the model the adapter "
                                "was trained on")
    try:
        base = load_model(base_path, dtype=dtype, trust_remote_code=trust_remote_code,
                          attn_implementation=attn_implementation)
    except OSError as e:  # FileNotFoundError included; also a hub id that cannot be reached
        raise FileNotFoundError(f"{path}: cannot load its base model {base_path} (adapter_config.json, "
                                f"base_model_name_or_path): {e}; edit that key to where the base model is") from e
    info_file = path / ADAPTER_INFO
    info = read_json(info_file) if info_file.is_file() else {}
    if info.get("latent_size"):
        processor = load_processor(path, trust_remote_code=trust_remote_code)
        tokens = add_latent_tokens(base, processor, int(info["latent_size"]))
        want = info.get("latent_token_ids")
        if want and want != {"start": tokens.start, "pad": tokens.pad, "end": tokens.end}:
            raise ValueError(f"{info_file}: latent_token_ids {want} but the adapter's tokenizer gives {tokens}; save "
                             "the adapter and its processor together")
    if info.get("latent_mode"):
        base.config.latent_mode = info["latent_mode"]
    model = PeftModel.from_pretrained(base, str(path), is_trainable=False).merge_and_unload()
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)
    return model


def export_merged(adapter_dir, output_dir, dtype=None, trust_remote_code: bool = False) -> None:
    """Merge the adapter(s) of ``adapter_dir`` into its base and save a full checkpoint (safetensors + processor)
    to ``output_dir``, atomically. Raises ``FileNotFoundError`` when ``adapter_dir`` holds no adapter."""
    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG}; `mirage-rl export` merges a LoRA adapter "
                                "(a stage trained with use_peft: true)")
    model = load_adapter_model(adapter_dir, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    model.name_or_path = model.config._name_or_path = str(output_dir)
    save_pretrained(model, load_processor(adapter_dir, trust_remote_code=trust_remote_code), output_dir,
                    command="export")


def weights_identity(path: str | os.PathLike, samples: int = 16, chunk: int = 1 << 16) -> list:
    """``[[file, bytes, digest], ...]`` of the ``*.safetensors`` (and adapter) files of a local model folder (empty for
    a hub id). The digest hashes the file's header and ``samples`` chunks spread over the file, so it costs the same
    for a 7B model as for the tiny one, stays equal when the same weights are written again (``make demo`` re-runs
    ``create-model``) and changes when training changed them (every tensor moves)."""
    import hashlib

    p = Path(path)
    if not p.is_dir():
        return []
    out = []
    for f in sorted(p.glob("*.safetensors")):
        size = f.stat().st_size
        h = hashlib.blake2b(digest_size=12)
        with open(f, "rb") as fh:
            for i in range(samples + 1):
                fh.seek(0 if i == 0 else max(0, (size - chunk) * i // samples))
                h.update(fh.read(chunk))
        out.append([f.name, size, h.hexdigest()])
    return out
