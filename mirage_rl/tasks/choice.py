"""Multiple-choice tasks (VSP spatial reasoning, jigsaw, SAT, COMT): one letter per answer, scored by exact match.

A :class:`ChoiceTask` parses the letter (:func:`mirage_rl.tasks.answers.parse_choice`: the last ``\\boxed{}``, or
with ``paren_fallback`` BLINK's ``(A)`` form), scores it against the item's ``answer`` and summarizes accuracy, the
invalid rate (no letter, or one that is not a choice) and the confusion matrix ``{gold: {predicted or "invalid":
count}}``. Its chance levels come from :func:`choice_chance`.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from .answers import parse_choice
from .base import Task


class ChoiceTask(Task):
    """A task whose answer is one letter of ``letters`` (subclass it; set ``letters`` and ``paren_fallback``)."""

    letters: str = "AB"
    paren_fallback: bool = False
    metrics = (("accuracy", "accuracy"), ("invalid_rate", "invalid"))
    chance_labels = {"uniform": "uniform choice", "majority_class": "majority class of the level's training rows"}

    def parse_answer(self, completion):
        return parse_choice(completion, self.letters, self.paren_fallback)

    def score(self, item, completion):
        pred = self.parse_answer(completion)
        return {"pred": pred, "gold": item.answer, "correct": pred == item.answer}

    def summarize(self, samples):
        n = len(samples)
        confusion: dict[str, dict[str, int]] = {g: {p: 0 for p in [*self.letters, "invalid"]} for g in self.letters}
        for r in samples:
            confusion.setdefault(r["gold"], {})
            key = r["pred"] or "invalid"
            confusion[r["gold"]][key] = confusion[r["gold"]].get(key, 0) + 1
        return {"n": n, "accuracy": sum(r["correct"] for r in samples) / n,
                "invalid_rate": sum(r["pred"] is None for r in samples) / n, "confusion": confusion}

    def chance_baselines(self, dataset_path, benchmark_dir, levels=None, items_file=None):
        return choice_chance(self, dataset_path, self.load_benchmark(benchmark_dir, levels, items_file))


def choice_chance(task: ChoiceTask, dataset_path: str, items) -> dict:
    """Chance levels per test level: ``uniform`` (a letter drawn uniformly: ``1 / len(letters)``) and
    ``majority_class`` (the most frequent answer of the training rows of that level, all levels when the level has
    none, scored on the test items of the level). Training answers are read from the ``solution`` column.

    Returns ``{level: {"uniform": {"accuracy"}, "majority_class": {"accuracy", "class", "from_levels"}}}``.
    Raises ``ValueError`` when the training set has no choice answer.
    """
    from ..data.disk import load_dataset_folder
    from .answers import normalize_choice

    ds = load_dataset_folder(dataset_path)
    ds = ds["train"] if hasattr(ds, "keys") else ds
    levels = ds["level"] if "level" in ds.column_names else [None] * len(ds)
    train: dict = defaultdict(Counter)
    for level, sol in zip(levels, ds["solution"]):
        letter = normalize_choice(sol)
        if letter is not None:
            train[str(level)][letter] += 1
            train["all"][letter] += 1
    if not train["all"]:
        raise ValueError(f"{dataset_path}: no training row has a choice letter in 'solution': no chance level")
    by_level: dict = defaultdict(list)
    for it in items:
        by_level[str(it.level)].append(it.answer)
    out = {}
    for level, golds in sorted(by_level.items(), key=lambda x: int(x[0]) if x[0].isdigit() else x[0]):
        source = level if train.get(level) else "all"
        major = max(sorted(train[source]), key=lambda c: train[source][c])
        out[level] = {"uniform": {"accuracy": 1 / len(task.letters)},
                      "majority_class": {"accuracy": sum(g == major for g in golds) / len(golds), "class": major,
                                         "from_levels": source}}
    return out
