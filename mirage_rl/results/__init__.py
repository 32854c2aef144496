"""``mirage-rl results``: the controlled comparison of docs/RESULTS.md, run, aggregated and published in one command.

Do latent visual tokens help? Arms on the same data with the same budget (recipes ``{recipe_dir}/*_{variant}.yaml``):

======================  ==========================================================  ==============================
arm                     runs (each starts from the previous one)                    evaluated with
======================  ==========================================================  ==============================
direct_sft              direct_sft (no latent block)                                ``latent_mode: none``
direct_sft_matched      direct_sft_matched: as many answer-CE steps as stage 2 +    ``none``
                        0.1 x stage 1 (the budget-matched control)
input_upper_bound       input_upper_bound: Direct SFT with the helper image as a    ``none``, ``--helper_as_input``
                        second input image (``helper_as_input``)
mirage                  stage1 (helper image -> latents) -> stage2 (hidden-state)   ``hidden`` + interventions
dummy_latent            stage1 -> dummy_latent (latent slots fed the pad embedding)  ``dummy``
mirage_grpo             stage1 -> stage2 -> grpo (official-rule plan reward)        ``hidden`` + interventions
mirage_grpo_strict      stage1 -> stage2 -> grpo_strict (strict-rule reward)        ``hidden`` + interventions
direct_sft_grpo         direct_sft -> direct_sft_grpo (text-only RL baseline)       ``none``
direct_sft_grpo_strict  direct_sft -> direct_sft_grpo_strict                        ``none``
mirage_residual         stage1_residual (``latent_target: residual``) -> stage2_res.  ``hidden`` + interventions
mirage_alt_helper       stage1_alt_helper -> stage2_alt_helper, on ``alt_data_config``  ``hidden`` + interventions
                        (the same rows with the other helper image, ``alt_helper``)
mirage_grid             stage1_grid (``compress: grid``, k from its recipe, 16 in   ``hidden`` + interventions
                        ``*_small``: one target per merged visual token) -> stage2_grid
======================  ==========================================================  ==============================

The latent arms' evaluations run ``--latent_intervention`` (``interventions``, all eight by default) with the oracle
their stage 1 was trained towards (``helper`` / ``alt_helper``, ``--oracle_target residual``, ``--oracle_compress grid``); the report tabulates
them on the headline levels, with the latent geometry and the targets' informativeness. ``one_seed_arms`` run on the
first seed only (a screening run of a variant).

What runs, in order (each step a ``python -m mirage_rl ...`` subprocess, its output in ``output_root``):

1. the data: ``build-data`` of ``data_config`` (and of ``alt_data_config`` for ``mirage_alt_helper``) (the task is the eval recipe's: ``plan`` for docs/RESULTS.md; any task
   of :mod:`mirage_rl.tasks`, e.g. ``--recipe_dir recipes/jigsaw --variant demo --data_config data/jigsaw_small.yaml
   --benchmark_dir ../shared/data/photos --arms direct_sft mirage dummy_latent mirage_grpo``);
2. the seeing tiny base every arm and seed starts from, like a released VLM: ``base-model`` of ``base_config``
   (:mod:`mirage_rl.base_model`: create-model, perception pretraining on the describe task with the vision tower
   trained, every later stage keeping it frozen as Mirage does, and ``eval --task describe`` of it). It is cached
   under ``outputs/base`` and shared with ``make demo``;
3. per seed, the runs of the selected arms (shared runs once) with ``--seed S``, then ``eval`` of each arm's last run
   (``eval_{variant}.yaml``).

Independent steps run ``jobs`` at a time (each with ``OMP_NUM_THREADS = cpu_count // jobs``). A finished step is
recorded in ``output_root/steps.json`` (command, wall time) and never rerun, so a killed ``make results`` resumes
where it stopped (a killed training run also resumes from its last checkpoint). After every evaluation the report is
rewritten from what exists: ``results.json`` (every number), ``{figure}`` and the block between the markers of
``{report}`` (the block named ``report_block``: two comparisons share docs/RESULTS.md) (per rate metric of the task a table of arms x levels, the headline levels being the training set's
(``focus_levels``), the task's chance rows, per-seed p-values against its first chance baseline, commands, wall
times, machine); the text outside the markers is kept as written.

Chance levels are computed from the training set only: *random plan* = expected accuracy of a plan drawn from the
training answers of the map's level (a model that knows the map size and nothing else); *best blind plan* = the one
training plan of the level that succeeds on most training maps of that level, scored on the test maps (the best a
model that ignores the image could learn from this data).
"""

from __future__ import annotations

from .arguments import ARMS, LATENT_ARMS, RUNS, ResultsArguments, arm_label, arm_seeds
from .machine import git_commit, machine
from .plan import Step, base_path, plan
from .report import BEGIN, END, collect, format_report, markers, write_report, run_results
from .runner import StepLog, execute, run_step
from .stats import binomial_tail, focus_rate, mean_std

__all__ = ["ARMS", "BEGIN", "END", "LATENT_ARMS", "RUNS", "arm_label", "arm_seeds", "markers", "ResultsArguments", "Step", "StepLog", "binomial_tail", "collect",
           "base_path", "execute", "focus_rate", "format_report", "git_commit", "machine", "mean_std", "plan",
           "run_results",
           "run_step", "write_report"]
