"""The training rows of VSP spatial planning (``build-data`` with ``source: vsp``).

Rows: ``prompt`` (conversational, one image), ``image`` (the map, VSP style), ``helper_image`` (the map with the
shortest path drawn as red arrows, or its cells filled with ``helper: filled``), ``answer`` (``<output_image>`` marker where the latent block goes, then
``\\boxed{...}``: Mirage's "direct" variant), ``solution`` (the boxed plan alone), ``map_desc``, ``level``,
``source`` and ``map_id``. Every training map equal to a test map is removed (Mirage's published split leaks 7).
Task ``describe`` (perception): the answer is the map as a table, no latent block, the map its own helper image.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ...data.images import encode_png
from ...data.jsonl import jsonl_rows, text_field
from ...data.messages import LATENT_MARKER, to_messages
from .maps import generate_maps, load_benchmark, map_key, map_to_text, plan_to_answer, render_helper, render_map
from .maps import HELPERS, shortest_plan, validate_map
from .prompts import DESCRIBE_PROMPT, PROMPTS
from .scoring import parse_plan, replay


def vsp_row(map_desc, plan, level, source, map_id, prompt_text, task: str = "plan", helper: str = "arrows") -> dict:
    """One training row of a map (module docstring): ``task`` plan or describe; ``helper``: the helper image of
    ``plan`` (``maps.render_helper``: arrows, the paper's, or filled)."""
    image = encode_png(render_map(map_desc))
    if task == "describe":  # the perception task: the map as text, no latent block, the map as its own helper
        prompt_text, solution = DESCRIBE_PROMPT, map_to_text(map_desc)
        answer, helper_png = solution, image
    else:
        solution = plan_to_answer(plan)
        answer, helper_png = LATENT_MARKER + solution, encode_png(render_helper(map_desc, plan, helper))
    return {
        "prompt": to_messages(prompt_text),
        "image": image,
        "helper_image": helper_png,
        "answer": answer,
        "solution": solution,
        "map_desc": map_desc,
        "level": level,
        "source": source,
        "map_id": str(map_id),
    }


def build_rows(args, bad):
    """The VSP training rows of ``args`` (``mirage_rl.data.build.BuildDataArguments``, ``source: vsp``): Mirage's train
    maps (minus every map equal to a test map, minus other levels) and ``num_generated`` seeded maps, each a
    :func:`vsp_row` of ``args.task``. Returns ``(rows, extra_features, counts)`` for ``mirage_rl.data.build``.

    Raises:
        ValueError: naming the file and line of a Mirage row that is malformed or whose plan fails (unless
            ``skip_bad_rows``: then handed to ``bad``), or no row left.
    """
    from datasets import Sequence, Value

    if args.helper not in (None, *HELPERS):
        raise ValueError(f"helper: task {args.task} draws {list(HELPERS)}, got {args.helper!r}")
    test_keys = {map_key(m.map_desc) for m in load_benchmark(args.test_dir)}
    train = jsonl_rows(args.train_jsonl, on_error=bad)
    if args.max_train_maps is not None:
        train = train[: args.max_train_maps]
    rows, leaked, other_level, seen = [], 0, 0, set(test_keys)
    for i, r in tqdm(train, desc="render Mirage train maps"):
        where = f"{args.train_jsonl}:{i}"
        try:
            map_desc, given, level = check_train_row(r, where, args.max_text_chars)
        except ValueError as e:
            bad(e, i)
            continue
        if args.train_levels is not None and level not in args.train_levels:
            other_level += 1
            continue
        key = map_key(map_desc)
        if key in test_keys:
            leaked += 1
            continue
        seen.add(key)
        rows.append(vsp_row(map_desc, given, level, "mirage", r.get("map_id", i), PROMPTS[args.prompt],
                         args.task, args.helper or "arrows"))
    generated = generate_maps(args.num_generated, sizes=args.generated_sizes, seed=args.seed,
                                  hole_prob=args.hole_prob, exclude=seen)
    for j, m in enumerate(tqdm(generated, desc="render generated maps", disable=not generated)):
        rows.append(vsp_row(m, shortest_plan(m), len(m), "generated", f"gen-{args.seed}-{j}", PROMPTS[args.prompt],
                         args.task, args.helper or "arrows"))
    if not rows:
        raise ValueError(f"{args.train_jsonl}: no training maps left after removing test maps and generating {args.num_generated}")
    extra = {"map_desc": Sequence(Sequence(Value("int32"))), "level": Value("int32")}
    return rows, extra, {"mirage": len(rows) - len(generated), "generated": len(generated),
                         "removed_test_overlap": leaked, "removed_other_levels": other_level}


def check_train_row(r: dict, where: str, max_chars: int = 20_000):
    """``(map_desc, plan, level)`` of a Mirage VSP train row; ``ValueError`` naming ``where`` when it is malformed."""
    for key in ("map_desc", "text_output", "level"):
        if key not in r:
            raise ValueError(f"{where}: missing field {key!r} (a VSP train row needs map_desc, text_output, level)")
    text_output = text_field(r, "text_output", where, max_chars)
    if "text_input" in r:
        text_field(r, "text_input", where, max_chars)
    map_desc = validate_map(r["map_desc"], where=where)
    plan = shortest_plan(map_desc)
    given = parse_plan(text_output)
    if given is None or not replay(map_desc, given)[1]:
        raise ValueError(f"{where}: text_output {text_output[:80]!r} is not a successful plan for map_desc")
    if plan is None or len(given) != len(plan):
        raise ValueError(f"{where}: text_output is not a shortest plan (BFS finds {plan})")
    try:
        level = int(r["level"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: level must be an integer, got {r['level']!r}") from None
    return map_desc, given, level
