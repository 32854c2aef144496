"""The arms of the comparison, the runs they chain, and the arguments of ``mirage-rl results``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..interventions import INTERVENTIONS

#: run name -> (command, the run it starts from: "base" = the seeing tiny base of ``base_config``, the training set:
#: "main" = ``data_config``, "alt_helper" = ``alt_data_config``, the same rows with the other helper image)
RUNS = {
    "direct_sft": ("sft", "base", "main"),
    "stage1": ("sft", "base", "main"),
    "stage2": ("sft", "stage1", "main"),
    "dummy_latent": ("sft", "stage1", "main"),
    "grpo": ("grpo", "stage2", "main"),
    "direct_sft_grpo": ("grpo", "direct_sft", "main"),
    "direct_sft_matched": ("sft", "base", "main"),
    "grpo_strict": ("grpo", "stage2", "main"),
    "direct_sft_grpo_strict": ("grpo", "direct_sft", "main"),
    "input_upper_bound": ("sft", "base", "main"),
    "stage1_residual": ("sft", "base", "main"),
    "stage2_residual": ("sft", "stage1_residual", "main"),
    "stage1_alt_helper": ("sft", "base", "alt_helper"),
    "stage2_alt_helper": ("sft", "stage1_alt_helper", "alt_helper"),
    "stage1_grid": ("sft", "base", "main"),
    "stage2_grid": ("sft", "stage1_grid", "main"),
}
#: arm -> (label, the run whose checkpoint is evaluated)
ARMS = {
    "direct_sft": ("Direct SFT", "direct_sft"),
    "mirage": ("Mirage (stage 1 -> 2)", "stage2"),
    "dummy_latent": ("Dummy latents (stage 1 -> dummy stage 2)", "dummy_latent"),
    "mirage_grpo": ("Mirage + GRPO", "grpo"),
    "direct_sft_grpo": ("Direct SFT + GRPO", "direct_sft_grpo"),
    "direct_sft_matched": ("Direct SFT, budget-matched (stage-2 steps + 0.1 x stage-1 steps)", "direct_sft_matched"),
    "mirage_grpo_strict": ("Mirage + GRPO, strict-rule reward", "grpo_strict"),
    "direct_sft_grpo_strict": ("Direct SFT + GRPO, strict-rule reward", "direct_sft_grpo_strict"),
    "input_upper_bound": ("Input upper bound (Direct SFT, helper image as 2nd input)", "input_upper_bound"),
    "mirage_residual": ("Mirage, residual targets (helper - input features)", "stage2_residual"),
    "mirage_alt_helper": ("Mirage, other helper image", "stage2_alt_helper"),
    "mirage_grid": ("Mirage, grid targets (compress: grid, larger k)", "stage2_grid"),
}
#: the arms decoded with the model's own latents (latent_mode hidden): each gets the latent interventions
LATENT_ARMS = ("mirage", "mirage_grpo", "mirage_grpo_strict", "mirage_residual", "mirage_alt_helper", "mirage_grid")


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
    # the defaults are those of recipes/vsp_spatial_planning/results_small.yaml: `mirage-rl results` alone runs it
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds of every arm."})
    output_root: str = field(default="outputs/results/small", metadata={"help": "Where every run goes."})
    jobs: int = field(default=2, metadata={"help": "Steps run at once (each with cpu_count // jobs threads)."})
    report: str = field(default="docs/RESULTS.md", metadata={"help": "Markdown file whose generated block is rewritten."})
    figure: str = field(default="docs/figures/results_small.png", metadata={"help": "Accuracy-by-level figure (PNG)."})
    benchmark_dir: str = field(default="../shared/data/vsp/maze_planning", metadata={
        "help": "The benchmark of the comparison's task (VSP test maps; the photos folder for jigsaw)."})
    focus_levels: list[int] | None = field(default=None, metadata={
        "help": "Levels of the headline column and the per-seed test (default: the levels of the training set)."})
    one_seed_arms: list[str] | None = field(default=None, metadata={
        "help": "Arms run on the first seed only (a screening run of a variant: issue 21 section 3). Default: "
                "mirage_alt_helper and mirage_grid, those of them among arms."})
    helper: str | None = field(default="arrows", metadata={
        "help": "The helper-image variant of data_config (its build-data `helper`): the oracle of the latent "
                "interventions and the helper of the input upper bound (default: the task's)."})
    alt_data_config: str | None = field(default="data/vsp_spatial_planning_small_filled.yaml", metadata={
        "help": "build-data config of the same rows with another helper image (arm mirage_alt_helper)."})
    alt_helper: str | None = field(default="filled", metadata={"help": "The helper variant of alt_data_config."})
    interventions: list[str] = field(default_factory=lambda: list(INTERVENTIONS), metadata={
        "help": "The latent interventions of every latent arm's evaluation (mirage_rl.interventions; [] : none)."})
    report_block: str | None = field(default="vsp_spatial_planning", metadata={
        "help": "Name of this comparison's generated block in `report` (several comparisons share one page: "
                "<!-- results:begin NAME ... --> ... <!-- results:end NAME -->); unset: the unnamed block."})
    figure_interventions: str | None = field(default=None, metadata={
        "help": "PNG of the latent-intervention accuracies per latent arm (default: next to `figure`)."})
    run: bool = field(default=True, metadata={"help": "false (--no_run): only rebuild the report from the finished "
                                                      "steps of output_root."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into an output_root holding entries no mirage-rl run wrote (they are kept, never deleted)."})

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"arms: unknown {unknown}; known: {list(ARMS)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.one_seed_arms is None:
            self.one_seed_arms = [a for a in ("mirage_alt_helper", "mirage_grid") if a in self.arms]
        unknown = [a for a in self.one_seed_arms if a not in self.arms]
        if unknown:
            raise ValueError(f"one_seed_arms: {unknown} are not among arms {self.arms}")
        if "mirage_alt_helper" in self.arms and not (self.alt_data_config and self.alt_helper):
            raise ValueError("arm mirage_alt_helper needs alt_data_config (the rows with the other helper image) and "
                             "alt_helper (its name)")
        if self.interventions:
            from ..interventions import check_names

            self.interventions = check_names(self.interventions)
        if self.figure_interventions is None:
            self.figure_interventions = self.figure.replace(".png", "_interventions.png")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")


def arm_label(args: ResultsArguments, arm: str) -> str:
    """The label of ``arm`` in the report (the alternative-helper arm names its helper)."""
    label = ARMS[arm][0]
    if arm == "mirage_alt_helper" and args.alt_helper:
        label = f"Mirage, helper image: {args.alt_helper}"
    return label


def arm_seeds(args: ResultsArguments, arm: str) -> list[int]:
    """The seeds ``arm`` runs on: every seed, or the first one for ``one_seed_arms``."""
    return args.seeds[:1] if arm in args.one_seed_arms else list(args.seeds)
