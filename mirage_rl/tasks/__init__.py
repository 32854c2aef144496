"""Benchmark tasks behind one interface (:class:`mirage_rl.tasks.base.Task`), looked up by name.

=============  ======================================  ==============================================================
name           package                                 what
=============  ======================================  ==============================================================
``plan``       :mod:`mirage_rl.tasks.vsp_planning`     VSP spatial planning: a maze image -> a boxed action plan
``describe``   :mod:`mirage_rl.tasks.vsp_planning`     perception on the same maps: the map written as a table
``vsp_spatial_reasoning``  :mod:`mirage_rl.tasks.vsp_reasoning`  a maze and a full plan -> A goal, B hole, C safe
``jigsaw``     :mod:`mirage_rl.tasks.jigsaw`           a photo missing its lower-right corner + 2 candidates -> A or B
``sat``        :mod:`mirage_rl.tasks.jsonl_choice`     SAT items in Mirage's JSONL format (two choices, boxed)
``comt``       :mod:`mirage_rl.tasks.jsonl_choice`     COMT items in Mirage's JSONL format (A-D, last ``(X)``)
=============  ======================================  ==============================================================

A task module is imported when its name is first asked for, so that ``import rewards`` stays free of torch.
"""

from __future__ import annotations

import importlib

from .base import BenchmarkItem, Task

#: task name -> "module:attribute" of its Task instance
_REGISTRY = {
    "plan": "mirage_rl.tasks.vsp_planning.task:PLAN",
    "describe": "mirage_rl.tasks.vsp_planning.task:DESCRIBE",
    "vsp_spatial_reasoning": "mirage_rl.tasks.vsp_reasoning.task:REASONING",
    "jigsaw": "mirage_rl.tasks.jigsaw.task:JIGSAW",
    "sat": "mirage_rl.tasks.jsonl_choice:SAT",
    "comt": "mirage_rl.tasks.jsonl_choice:COMT",
}


def task_names() -> tuple[str, ...]:
    """The registered task names."""
    return tuple(_REGISTRY)


def get_task(name: str) -> Task:
    """The task registered as ``name``. Raises ``ValueError`` naming the known tasks."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {list(_REGISTRY)}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["BenchmarkItem", "Task", "get_task", "task_names"]
