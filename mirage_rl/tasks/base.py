"""The task interface: what evaluation, rewards, data building and the results runner ask of a benchmark task.

A task owns everything that depends on what is asked and how it is judged: its benchmark's items, its prompts, the
parsing and scoring of an answer, the metrics a report shows, the helper image of a training answer, its chance
levels and its training rows. Everything else (collation, latent fill, decoding, trainers, journals, reports) is
shared and task-blind. Tasks are looked up by name with :func:`mirage_rl.tasks.get_task`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class BenchmarkItem(Protocol):
    """One evaluation item: ``prompt_id`` (its identity in samples and errors, e.g. ``level3/7``), ``level`` (the
    group a report breaks results down by) and ``image_path`` (the image the prompt shows); plus what the task needs
    to score an answer (e.g. ``map_desc``)."""

    prompt_id: str
    level: int
    image_path: str


class Task:
    """A benchmark task (subclass it; :mod:`mirage_rl.tasks.vsp_planning` is the reference).

    Attributes:
        name: the registry name (``task:`` of ``build-data`` and ``eval``).
        prompts: the prompt variants by name (``prompt:`` of ``build-data`` and ``eval``); each holds one ``<image>``.
        metrics: ``(report key, label)`` pairs of the per-group rates a report shows, in order; the first two are
            plotted per level.
        has_latent_block: whether answers hold a latent block (``False``: evaluated with ``latent_mode: none``).
        benchmark_dir: the default benchmark folder.
    """

    name: str = ""
    prompts: Mapping[str, str] = {}
    metrics: tuple[tuple[str, str], ...] = ()
    has_latent_block: bool = True
    benchmark_dir: str = ""

    def prompt(self, variant: str) -> str:
        """The prompt text of ``variant``. Raises ``ValueError`` naming the task's variants."""
        if variant not in self.prompts:
            raise ValueError(f"prompt must be one of {sorted(self.prompts)} for task {self.name!r}, got {variant!r}")
        return self.prompts[variant]

    def load_benchmark(self, root: str, levels: list[int] | None = None) -> list[BenchmarkItem]:
        """Every evaluation item under ``root`` (only ``levels`` when given), in a fixed order."""
        raise NotImplementedError(f"task {self.name!r} has no benchmark loader")

    def parse_answer(self, completion: str) -> Any:
        """The answer a completion gives (``None`` when it gives none that parses)."""
        raise NotImplementedError(f"task {self.name!r} has no answer parser")

    def score(self, item: BenchmarkItem, completion: str) -> dict:
        """The per-sample fields of one completion (what ``samples.jsonl`` records and :meth:`summarize` reads)."""
        raise NotImplementedError(f"task {self.name!r} has no scorer")

    def summarize(self, samples: list[dict]) -> dict:
        """``{"n": len(samples), <metric>: rate, ...}`` over scored samples (one level, or all)."""
        raise NotImplementedError(f"task {self.name!r} has no summary")

    def helper_image(self, item: Any, answer: Any):
        """The helper image of a training answer (a ``PIL.Image``): what stage 1 encodes into the latent targets."""
        raise NotImplementedError(f"task {self.name!r} draws no helper image")

    def chance_baselines(self, dataset_path: str, benchmark_dir: str, levels: list[int] | None = None) -> dict:
        """``{level: {baseline: {metric: rate, ...}, ...}}``: what a model that ignores the image scores."""
        raise NotImplementedError(f"task {self.name!r} has no chance baselines")

    def build_rows(self, args, bad) -> tuple[list[dict], dict, dict]:
        """Training rows for ``build-data`` (``args``: ``BuildDataArguments``; ``bad``: ``BadRows``, handed each
        bad source row): ``(rows, extra datasets features, counts)``."""
        raise NotImplementedError(f"task {self.name!r} builds no training rows")
