"""Chance levels of VSP spatial planning, from the training split only.

*random plan* = expected accuracy of a plan drawn from the training answers of the map's level (a model that knows the
map size and nothing else); *best blind plan* = the one training plan of the level that succeeds on most training maps
of that level, scored on the test maps (the best a model that ignores the image could learn from this data).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from .maps import load_benchmark
from .scoring import parse_plan, replay


def blind_baselines(dataset_path: str, benchmark_dir: str, levels=None) -> dict:
    """Chance levels per test level (module docstring), both scoring rules, from the training split only.

    Returns ``{level: {"random_plan": {"accuracy", "accuracy_strict"}, "best_blind_plan": {..., "plan"},
    "from_levels": ...}}``. A test level with no training map (a transfer level) draws from the training maps of every
    level (``from_levels: "all"``). Raises ``ValueError`` when the training set is empty.
    """
    from ...data.disk import load_dataset_folder

    ds = load_dataset_folder(dataset_path)
    ds = ds["train"] if hasattr(ds, "keys") else ds
    ds = ds.select_columns(["solution", "map_desc", "level"])
    train_by_level: dict[int, list] = defaultdict(list)
    for row in ds:
        train_by_level[int(row["level"])].append((row["map_desc"], tuple(parse_plan(row["solution"]) or ())))
    test_by_level: dict[int, list] = defaultdict(list)
    for m in load_benchmark(benchmark_dir, levels):
        test_by_level[m.level].append(m.map_desc)
    def rate(p, maps):
        hits = [replay(m, list(p)) for m in maps]
        return sum(h[0] for h in hits) / len(maps), sum(h[1] for h in hits) / len(maps)

    best_of: dict[str, tuple] = {}  # from_levels -> best blind plan (the transfer levels share "all")
    out = {}
    for level, tests in sorted(test_by_level.items()):
        train = train_by_level.get(level)
        from_levels = str(level)
        if not train:
            train = [t for rows in train_by_level.values() for t in rows]
            from_levels = "all"
        if not train:
            raise ValueError(f"{dataset_path}: no training map: no chance level")
        counts = Counter(p for _, p in train if p)
        test_rate = {p: rate(p, tests) for p in counts}
        n = sum(counts.values())
        if from_levels not in best_of:
            train_maps = [m for m, _ in train]
            best_of[from_levels] = max(counts, key=lambda p: (rate(p, train_maps)[0], counts[p]))
        best = best_of[from_levels]
        out[str(level)] = {
            "random_plan": {"accuracy": sum(c * test_rate[p][0] for p, c in counts.items()) / n,
                            "accuracy_strict": sum(c * test_rate[p][1] for p, c in counts.items()) / n},
            "best_blind_plan": {"accuracy": test_rate[best][0], "accuracy_strict": test_rate[best][1],
                                "plan": ",".join(best)},
            "from_levels": from_levels,
        }
    return out
