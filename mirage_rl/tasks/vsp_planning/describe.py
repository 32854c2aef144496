"""Scoring of the perception task ``describe``: the map read off the image and written as a table."""

from __future__ import annotations

from .maps import map_to_text


def parse_table(text: str) -> list[list[str]]:
    """A describe-task answer as rows of cell symbols: one row per line, cells separated by whitespace."""
    return [line.split() for line in text.strip().split("\n")]


def score_table(map_desc: list[list[int]], text: str) -> dict:
    """Score a describe-task answer against the map: the answer's lines are the map's rows, its whitespace-separated
    symbols the cells (``@`` player, ``*`` goal, ``#`` hole, ``_`` safe, as :func:`maps.map_to_text` writes them).

    Returns ``table_exact`` (the whole table, nothing more or less), ``cells_right`` of ``n_cells`` (a missing
    cell counts wrong), ``player_found`` and ``goal_found`` (``@`` / ``*`` at the true cell).
    """
    want, got = parse_table(map_to_text(map_desc)), parse_table(text)

    def at(r: int, c: int) -> str | None:
        return got[r][c] if r < len(got) and c < len(got[r]) else None

    cells = [(r, c) for r in range(len(want)) for c in range(len(want[r]))]
    right = sum(at(r, c) == want[r][c] for r, c in cells)
    found = {sym: any(want[r][c] == sym and at(r, c) == sym for r, c in cells) for sym in "@*"}
    return {"table_exact": got == want, "cells_right": right, "n_cells": len(cells),
            "player_found": found["@"], "goal_found": found["*"]}
