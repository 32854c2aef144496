"""VSP spatial planning (maze navigation): maps, rendering, helper images, generator and the benchmark loader.

Source: VSP (Wu et al., 2024, "VSP: Diagnosing the Dual Challenges of Perception and Reasoning in
Spatial Planning Tasks for MLLMs") and the train/test splits of Mirage (arXiv 2506.17218, section 4).

A map is ``map_desc``: a square list of rows of ints, ``0`` safe, ``1`` player, ``2`` goal, ``-1`` hole
(see :mod:`mirage_rl.tasks.vsp_planning.scoring`). Maps are drawn exactly as VSP drew them: the FrozenLake sprites of
``gym==0.26.2`` (MIT licence, copied under ``assets/frozenlake/``, with the elf's four directions, the stool and the
cracked hole that VSP spatial reasoning's moved player needs), 32 px sprites scaled to 64 px
cells with nearest neighbour, a 1 px grid line of colour (180, 200, 230), the elf facing down, alpha
blending with pygame's integer formula. The test images re-render pixel-identically (tested).
"""

from __future__ import annotations

import logging
import random
import re
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scoring import GOAL, HOLE, MOVES, PLAYER, SAFE, find_cell
from ...data.jsonl import read_text

logger = logging.getLogger(__name__)

CELL_PX = 64
GRID_RGB = (180, 200, 230)
ARROW_RGB = (255, 0, 0)
_ASSETS = Path(__file__).parent / "assets" / "frozenlake"
MOVE_WORDS = {"L": "LEFT", "R": "RIGHT", "U": "UP", "D": "DOWN"}
TABLE_SYMBOLS = {"_": SAFE, "@": PLAYER, "*": GOAL, "#": HOLE}

# ----------------------------------------------------------------------------------------------- maps
def validate_map(map_desc, where: str = "map_desc") -> list[list[int]]:
    """Check that ``map_desc`` is a square grid (3..8) with one player, one goal, values in {-1,0,1,2}.

    Raises:
        ValueError: naming ``where`` and what is wrong.
    """
    if isinstance(map_desc, list) and not map_desc:
        raise ValueError(f"{where}: no map rows (an empty map); expected 3..8 rows of cells")
    if not isinstance(map_desc, list) or not all(isinstance(r, list) for r in map_desc):
        raise ValueError(f"{where}: expected a list of rows, got {type(map_desc).__name__}")
    n = len(map_desc)
    if any(len(r) != n for r in map_desc):
        raise ValueError(f"{where}: map must be square, got row lengths {[len(r) for r in map_desc]}")
    flat = [v for r in map_desc for v in r]
    if any(v not in (SAFE, PLAYER, GOAL, HOLE) for v in flat):
        raise ValueError(f"{where}: cells must be 0 (safe), 1 (player), 2 (goal) or -1 (hole)")
    if flat.count(PLAYER) != 1 or flat.count(GOAL) != 1:
        raise ValueError(f"{where}: need exactly one player (1) and one goal (2), got {flat.count(PLAYER)} and {flat.count(GOAL)}")
    return map_desc


def shortest_plan(map_desc: list[list[int]], start: tuple[int, int] | None = None) -> list[str] | None:
    """Shortest plan (list of ``L/R/U/D``) from ``start`` (default: the player's cell) to the goal that never enters
    a hole.

    Breadth-first search; ties are broken in the order L, R, U, D. Returns ``None`` if the goal is
    unreachable.
    """
    n = len(map_desc)
    start, goal = start or find_cell(map_desc, PLAYER), find_cell(map_desc, GOAL)
    prev: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            plan = []
            while prev[cell] is not None:
                cell, move = prev[cell]  # type: ignore[misc]
                plan.append(move)
            return plan[::-1]
        for move, (dr, dc) in MOVES.items():
            nr, nc = cell[0] + dr, cell[1] + dc
            if 0 <= nr < n and 0 <= nc < n and (nr, nc) not in prev and map_desc[nr][nc] != HOLE:
                prev[(nr, nc)] = (cell, move)
                queue.append((nr, nc))
    return None


def generate_maps(n_maps: int, sizes=range(3, 9), seed: int = 0, hole_prob: float = 0.25,
                  exclude: set | None = None) -> list[list[list[int]]]:
    """Generate ``n_maps`` distinct solvable maps with sizes drawn uniformly from ``sizes``.

    Holes are placed independently with probability ``hole_prob``; player and goal on distinct safe
    cells; a map is kept only if BFS finds a path and it is not in ``exclude`` (a set of
    :func:`map_key`). Deterministic for a given ``seed``.
    """
    sizes = list(sizes)
    if any(s < 3 or s > 8 for s in sizes):
        raise ValueError(f"map sizes must lie in 3..8, got {sizes}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    maps: list[list[list[int]]] = []
    attempts = 0
    while len(maps) < n_maps:
        attempts += 1
        if attempts > 1000 * max(n_maps, 1):
            raise RuntimeError(f"could not generate {n_maps} distinct solvable maps (got {len(maps)}); lower hole_prob")
        n = rng.choice(sizes)
        grid = [[HOLE if rng.random() < hole_prob else SAFE for _ in range(n)] for _ in range(n)]
        cells = [(r, c) for r in range(n) for c in range(n)]
        (pr, pc), (gr, gc) = rng.sample(cells, 2)
        grid[pr][pc], grid[gr][gc] = PLAYER, GOAL
        key = map_key(grid)
        if key in seen or shortest_plan(grid) is None:
            continue
        seen.add(key)
        maps.append(grid)
    return maps


def map_key(map_desc: list[list[int]]) -> tuple:
    """Hashable identity of a map (used to remove train/test overlap)."""
    return tuple(tuple(r) for r in map_desc)


# ------------------------------------------------------------------------------------------ rendering
@lru_cache(maxsize=None)
def _sprite(name: str) -> np.ndarray:
    img = Image.open(_ASSETS / f"{name}.png").convert("RGBA").resize((CELL_PX, CELL_PX), Image.NEAREST)
    return np.asarray(img).astype(np.int32)


def _blit(canvas: np.ndarray, sprite: np.ndarray, row: int, col: int) -> None:
    # pygame's per-pixel alpha blend: d + (((s - d) * a + s) >> 8)
    y, x = row * CELL_PX, col * CELL_PX
    dst = canvas[y : y + CELL_PX, x : x + CELL_PX]
    src, alpha = sprite[..., :3], sprite[..., 3:4]
    canvas[y : y + CELL_PX, x : x + CELL_PX] = dst + (((src - dst) * alpha + src) >> 8)


def render_map(map_desc: list[list[int]]) -> Image.Image:
    """Draw a map in the VSP style: an RGB image of ``64 * n`` pixels square."""
    canvas = render_cells(map_desc)
    _blit(canvas, _sprite("elf_down"), *find_cell(map_desc, PLAYER))
    return Image.fromarray(canvas.astype(np.uint8), "RGB")


def render_cells(map_desc: list[list[int]], stool_at: tuple[int, int] | None = None) -> np.ndarray:
    """The map's cells without the player (ice, holes, goal, grid lines): an ``(64 n, 64 n, 3)`` int32 canvas that
    :func:`render_map` (and VSP spatial reasoning's moved player) draws the sprites on. ``stool_at``: the start cell
    of a player that moved, drawn with FrozenLake's stool under the grid lines, as gym draws it."""
    n = len(map_desc)
    canvas = np.zeros((n * CELL_PX, n * CELL_PX, 3), np.int32)
    for r in range(n):
        for c in range(n):
            _blit(canvas, _sprite("ice"), r, c)
            if map_desc[r][c] == HOLE:
                _blit(canvas, _sprite("hole"), r, c)
            elif map_desc[r][c] == GOAL:
                _blit(canvas, _sprite("goal"), r, c)
            elif (r, c) == stool_at:
                _blit(canvas, _sprite("stool"), r, c)
            y, x = r * CELL_PX, c * CELL_PX
            canvas[y, x : x + CELL_PX] = canvas[y + CELL_PX - 1, x : x + CELL_PX] = GRID_RGB
            canvas[y : y + CELL_PX, x] = canvas[y : y + CELL_PX, x + CELL_PX - 1] = GRID_RGB
    return canvas


#: The helper images of VSP spatial planning: ``arrows`` (the paper's) and ``filled`` (ours, issue 21).
HELPERS = ("arrows", "filled")


def render_helper(map_desc: list[list[int]], plan: list[str], helper: str = "arrows") -> Image.Image:
    """The helper image: the map with ``plan`` drawn on it from the player to the goal.

    ``arrows``: the path as red arrows, as Mirage (section 3.1) builds helper images for VSP. ``filled`` (ours): every
    cell the path enters filled red (alpha 0.6), a drawing that survives pooling at the small model's resolution
    (issue 21: a 6 px arrow on a 112 px image leaves the pooled stage-1 targets nearly constant).

    Raises:
        ValueError: an unknown ``helper``.
    """
    if helper == "filled":
        return _render_filled(map_desc, plan)
    if helper != "arrows":
        raise ValueError(f"VSP spatial planning helper must be one of {HELPERS}, got {helper!r}")
    img = render_map(map_desc)
    draw = ImageDraw.Draw(img)
    n = len(map_desc)
    r, c = find_cell(map_desc, PLAYER)
    half, head = CELL_PX // 2, CELL_PX // 6
    for move in plan:
        dr, dc = MOVES[move]
        nr, nc = min(max(r + dr, 0), n - 1), min(max(c + dc, 0), n - 1)
        if (nr, nc) == (r, c):
            continue
        x0, y0 = c * CELL_PX + half, r * CELL_PX + half
        x1, y1 = nc * CELL_PX + half, nr * CELL_PX + half
        draw.line([(x0, y0), (x1, y1)], fill=ARROW_RGB, width=6)
        # arrow head at the end of the segment, pointing along (dc, dr)
        px, py = -dr, dc
        tip = (x1 - dc * head // 2, y1 - dr * head // 2)
        base = (tip[0] - dc * head, tip[1] - dr * head)
        draw.polygon([tip, (base[0] + px * head, base[1] + py * head), (base[0] - px * head, base[1] - py * head)],
                     fill=ARROW_RGB)
        r, c = nr, nc
    return img


def _render_filled(map_desc: list[list[int]], plan: list[str]) -> Image.Image:
    """``filled`` (:func:`render_helper`): each cell the plan enters (the start excluded) blended 0.6 towards red."""
    img = render_map(map_desc)
    layer = img.copy()
    draw = ImageDraw.Draw(layer)
    n, (r, c) = len(map_desc), find_cell(map_desc, PLAYER)
    for move in plan:
        dr, dc = MOVES[move]
        r, c = min(max(r + dr, 0), n - 1), min(max(c + dc, 0), n - 1)
        draw.rectangle([c * CELL_PX + 4, r * CELL_PX + 4, (c + 1) * CELL_PX - 5, (r + 1) * CELL_PX - 5], fill=ARROW_RGB)
    return Image.blend(img, layer, 0.6)


def map_to_text(map_desc: list[list[int]]) -> str:
    """The map as text, one row per line, cells separated by spaces (``@`` player, ``*`` goal, ``#`` hole,
    ``_`` safe): the answer of the perception task ``describe``."""
    symbol = {v: k for k, v in TABLE_SYMBOLS.items()}
    return "\n".join(" ".join(symbol[v] for v in row) for row in map_desc)


def plan_to_answer(plan: list[str]) -> str:
    """``["R", "D"]`` -> ``\\boxed{RIGHT, DOWN}`` (the answer format of Mirage's VSP split)."""
    return "\\boxed{" + ", ".join(MOVE_WORDS[m] for m in plan) + "}"


# ------------------------------------------------------------------------------------------- loaders
@dataclass
class BenchmarkMap:
    """One evaluation map of a VSP folder."""

    map_id: str
    level: int
    image_path: str
    map_desc: list[list[int]]

    @property
    def prompt_id(self) -> str:
        """``level3/7``: the map's identity in evaluation samples and error messages."""
        return f"level{self.level}/{self.map_id}"


def parse_table(path: Path) -> list[list[int]]:
    """Parse a VSP ``table/N.txt`` (``| Row 1 | _ | * | ...``) into ``map_desc``.

    Raises:
        ValueError: naming the file, when a row has an unknown symbol or the map is not valid.
    """
    rows = []
    for line in read_text(path, "a VSP table: lines like `| Row 1 | @ | _ | * |`").splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if not cells or not cells[0].startswith("Row"):
            continue
        try:
            rows.append([TABLE_SYMBOLS[s] for s in cells[1:]])
        except KeyError as e:
            raise ValueError(f"{path}: unknown cell symbol {e.args[0]!r}; expected one of {sorted(TABLE_SYMBOLS)}") from None
    if not rows:
        raise ValueError(f"{path}: no table rows (lines like `| Row 1 | @ | _ | * |`): the file is empty or not a VSP "
                         "table; restore it from the benchmark")
    return validate_map(rows, where=str(path))


def load_benchmark(root: str | Path, levels: list[int] | None = None) -> list[BenchmarkMap]:
    """Load every map of a VSP folder laid out as ``levelN/img/K.png`` + ``levelN/table/K.txt``.

    Maps are ordered by level, then by numeric id.

    Raises:
        FileNotFoundError: if ``root`` has no ``level*`` folders or a map has no table or no image.
    """
    root = Path(root)
    level_dirs = sorted((d for d in root.glob("level*") if re.fullmatch(r"level\d+", d.name)),
                        key=lambda d: int(d.name[5:]))
    if not level_dirs:
        raise FileNotFoundError(f"{root}: no 'levelN/' folders; expected the VSP layout levelN/img/*.png + levelN/table/*.txt")
    maps = []
    for d in level_dirs:
        level = int(d.name[5:])
        if levels is not None and level not in levels:
            continue
        images = sorted((d / "img").glob("*.png"), key=lambda p: (len(p.stem), p.stem))
        if not images:
            raise FileNotFoundError(f"{d / 'img'}: no PNG maps")
        orphans = sorted({t.stem for t in (d / "table").glob("*.txt")} - {p.stem for p in images})
        if orphans:
            raise FileNotFoundError(f"{d / 'table'}: tables {orphans[:5]} have no image {d / 'img'}/<id>.png; "
                                    "restore the images or remove the tables (no map is skipped silently)")
        for img in images:
            table = d / "table" / f"{img.stem}.txt"
            if not table.exists():
                raise FileNotFoundError(f"{table}: missing table for map image {img}")
            maps.append(BenchmarkMap(img.stem, level, str(img), parse_table(table)))
    if not maps:
        raise ValueError(f"{root}: no maps for levels {levels}")
    return maps
