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
    """One evaluation item: ``prompt_id`` (its identity in samples and errors, e.g. ``level3/7``) and ``level`` (the
    group a report breaks results down by); plus what :meth:`Task.item_images` needs to give its input images (VSP:
    ``image_path``) and what the task needs to score an answer (e.g. ``map_desc``)."""

    prompt_id: str
    level: int


class Task:
    """A benchmark task (subclass it; :mod:`mirage_rl.tasks.vsp_planning` is the reference).

    Attributes:
        name: the registry name (``task:`` of ``build-data`` and ``eval``).
        prompts: the prompt variants by name (``prompt:`` of ``build-data`` and ``eval``); each holds one ``<image>``
            per input image (a task whose prompt differs per item fills in the rest in :meth:`item_prompt`).
        metrics: ``(report key, label)`` pairs of the per-group rates a report shows, in order; the first two are
            plotted per level.
        chance_labels: the names reports give the chance baselines.
        has_latent_block: whether answers hold a latent block (``False``: evaluated with ``latent_mode: none``).
        benchmark_dir: the default benchmark folder.
    """

    name: str = ""
    prompts: Mapping[str, str] = {}
    #: chance baseline (a key of :meth:`chance_baselines`' per-level dicts) -> how reports name it
    chance_labels: Mapping[str, str] = {}
    #: the per-sample field (of :meth:`score`) that says the answer is right: paired tests read it
    correct_key: str = "correct"
    metrics: tuple[tuple[str, str], ...] = ()
    has_latent_block: bool = True
    benchmark_dir: str = ""

    def prompt(self, variant: str) -> str:
        """The prompt text of ``variant``. Raises ``ValueError`` naming the task's variants."""
        if variant not in self.prompts:
            raise ValueError(f"prompt must be one of {sorted(self.prompts)} for task {self.name!r}, got {variant!r}")
        return self.prompts[variant]

    def item_prompt(self, item: BenchmarkItem, variant: str) -> str:
        """The prompt of one evaluation item (default: the variant's prompt, the same for every item; a task whose
        question differs per item, e.g. the action plan of VSP spatial reasoning, overrides it). It holds one
        ``<image>`` per image of :meth:`item_images`."""
        return self.prompt(variant)

    def item_images(self, item: BenchmarkItem, where: str) -> list:
        """The input images (``PIL.Image``, RGB) of one evaluation item, in the order of its prompt's ``<image>``
        markers (default: the file ``item.image_path``). Raises ``FileNotFoundError``/``ValueError`` naming ``where``."""
        from ..data.images import open_image

        return [open_image(item.image_path, where=where)]

    #: the committed test items of a task whose items are not files of the benchmark folder (``data/*.jsonl``,
    #: relative to the repository root); ``None``: the items are the folder's own
    items_file: str | None = None

    def load_benchmark(self, root: str, levels: list[int] | None = None,
                       items_file: str | None = None) -> list[BenchmarkItem]:
        """Every evaluation item under ``root`` (only ``levels`` when given), in a fixed order; ``items_file``
        overrides :attr:`items_file`."""
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

    def item_answer(self, item: BenchmarkItem):
        """The right answer of an evaluation item as a hashable (default: its ``answer`` attribute, ``None`` when it
        has none): the latent geometry asks whether items near each other share it."""
        return getattr(item, "answer", None)

    def oracle_image(self, item: BenchmarkItem, helper: str | None = None):
        """The helper image of a test item (``PIL.Image``): what stage 1 would have encoded for it, the ``oracle``
        latent intervention's source (``helper``: the variant, for tasks that offer several). ``None``: the task
        cannot draw one."""
        return None

    def chance_baselines(self, dataset_path: str, benchmark_dir: str, levels: list[int] | None = None,
                         items_file: str | None = None) -> dict:
        """``{level: {baseline: {metric: rate, ...}, ...}}``: what a model that ignores the image scores."""
        raise NotImplementedError(f"task {self.name!r} has no chance baselines")

    def build_rows(self, args, bad) -> tuple[list[dict], dict, dict]:
        """Training rows for ``build-data`` (``args``: ``BuildDataArguments``; ``bad``: ``BadRows``, handed each
        bad source row): ``(rows, extra datasets features, counts)``."""
        raise NotImplementedError(f"task {self.name!r} builds no training rows")
