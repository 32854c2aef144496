"""The arms of the comparison, the runs they chain, and the arguments of ``mirage-rl results``."""

from __future__ import annotations

from dataclasses import dataclass, field

#: run name -> (command, the run it starts from: "base" = the seeing tiny base of ``base_config``)
RUNS = {
    "direct_sft": ("sft", "base"),
    "stage1": ("sft", "base"),
    "stage2": ("sft", "stage1"),
    "dummy_latent": ("sft", "stage1"),
    "grpo": ("grpo", "stage2"),
    "direct_sft_grpo": ("grpo", "direct_sft"),
}
#: arm -> (label, the run whose checkpoint is evaluated)
ARMS = {
    "direct_sft": ("Direct SFT", "direct_sft"),
    "mirage": ("Mirage (stage 1 -> 2)", "stage2"),
    "dummy_latent": ("Dummy latents (stage 1 -> dummy stage 2)", "dummy_latent"),
    "mirage_grpo": ("Mirage + GRPO", "grpo"),
    "direct_sft_grpo": ("Direct SFT + GRPO", "direct_sft_grpo"),
}


@dataclass
class ResultsArguments:
    """Arguments of ``mirage-rl results`` (``recipes/vsp_spatial_planning/results_small.yaml``)."""

    recipe_dir: str = field(default="recipes/vsp_spatial_planning", metadata={"help": "Folder of the recipes."})
    variant: str = field(default="small", metadata={"help": "Recipe variant: {run}_{variant}.yaml (mirage_rl.recipe.recipe_path)."})
    data_config: str = field(default="data/vsp_spatial_planning_small.yaml", metadata={
        "help": "build-data config of the training set (the task of the eval recipe, e.g. plan)."})
    base_config: str = field(default="recipes/vsp_spatial_planning/base_small.yaml", metadata={
        "help": "base-model config of the seeing tiny base every arm starts from (shared with `make demo`)."})
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": f"A subset of {list(ARMS)}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds of every arm."})
    output_root: str = field(default="outputs/results/small", metadata={"help": "Where every run goes."})
    jobs: int = field(default=2, metadata={"help": "Steps run at once (each with cpu_count // jobs threads)."})
    report: str = field(default="docs/RESULTS.md", metadata={"help": "Markdown file whose generated block is rewritten."})
    figure: str = field(default="docs/figures/results_small.png", metadata={"help": "Accuracy-by-level figure (PNG)."})
    benchmark_dir: str = field(default="../shared/data/vsp/maze_planning", metadata={
        "help": "The benchmark of the comparison's task (VSP test maps; the photos folder for jigsaw)."})
    focus_levels: list[int] | None = field(default=None, metadata={
        "help": "Levels of the headline column and the per-seed test (default: the levels of the training set)."})
    run: bool = field(default=True, metadata={"help": "false: only rebuild the report from the finished steps."})

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"arms: unknown {unknown}; known: {list(ARMS)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
