"""SAT and COMT: multiple-choice tasks whose items come in Mirage's JSONL format (no data of theirs ships here).

Their images are only on the model hub, and SAT's helper images come from a video model, so mirage-rl reads them
from a JSONL the user has: each row ``text_input`` (one ``<image>`` per input image), ``image_input`` (a path or a
list of paths, in marker order, relative to ``benchmark_dir``), and the gold answer as ``answer`` (a letter,
``"B"`` or ``"(B)"``) or else read from ``text_output`` by the task's rule. Training rows are built by
``build-data`` with ``source: mirage_jsonl`` (``data/sat_sample.yaml``, ``data/comt_sample.yaml``); evaluation is
``mirage-rl eval --task sat --benchmark_dir IMAGE_ROOT --items_file TEST.jsonl``.

* **SAT** (Ray et al., 2024, "SAT: Spatial Aptitude Training"): two choices, the answer in ``\\boxed{}``.
* **COMT** (Cheng et al., 2024, "CoMT: Chain of Multi-modal Thought"): four choices A-D; the answer is the last
  ``(X)`` of the response (a box, when there is one, is read first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.images import open_image
from ..data.jsonl import jsonl_rows, text_field
from .answers import normalize_choice, parse_choice
from .choice import ChoiceTask
from .items_file import resolve_items_file


@dataclass
class JsonlItem:
    """One row of a Mirage-format JSONL benchmark."""

    prompt_id: str
    text: str
    image_paths: list[str]
    answer: str
    level: int = 1


class JsonlChoice(ChoiceTask):
    """A choice task read from Mirage's JSONL format (module docstring); ``benchmark_dir`` is the image root and
    ``items_file`` the JSONL."""

    prompts = {"test": "", "train": "", "short": ""}  # each item carries its own prompt (text_input)
    items_file = None

    def __init__(self, name: str, letters: str, paren_fallback: bool):
        self.name, self.letters, self.paren_fallback = name, letters, paren_fallback

    def item_prompt(self, item, variant):
        return item.text

    def item_images(self, item, where):
        return [open_image(p, where=f"{where} image_input") for p in item.image_paths]

    def load_benchmark(self, root, levels=None, items_file=None):
        """The rows of ``items_file`` (required) with images under ``root``.

        Raises:
            ValueError: no ``items_file``; or naming the file and line: a missing field, a ``<image>`` count that
                differs from the images, or no gold letter among the task's choices.
        """
        if not (items_file or self.items_file):
            raise ValueError(f"task {self.name}: pass items_file: the JSONL of test items (Mirage's format; "
                             "docs/TASKS.md) and benchmark_dir: the folder its image paths resolve against")
        path = resolve_items_file(items_file or self.items_file)
        items = []
        for i, r in jsonl_rows(path):
            where = f"{path}:{i}"
            for key in ("text_input", "image_input"):
                if key not in r:
                    raise ValueError(f"{where}: missing {key!r} (a {self.name} item needs text_input, image_input and "
                                     "answer or text_output)")
            text = text_field(r, "text_input", where, 100_000)
            paths = r["image_input"] if isinstance(r["image_input"], list) else [r["image_input"]]
            if text.count("<image>") != len(paths):
                raise ValueError(f"{where}: text_input has {text.count('<image>')} <image> marker(s) for "
                                 f"{len(paths)} image(s)")
            gold = normalize_choice(str(r["answer"])) if r.get("answer") is not None else \
                parse_choice(str(r.get("text_output", "")), self.letters, self.paren_fallback)
            if gold is None or gold not in self.letters:
                raise ValueError(f"{where}: no gold answer among {list(self.letters)} (give 'answer', or a "
                                 "text_output the task's rule reads)")
            items.append(JsonlItem(str(r.get("id", r.get("map_id", i))), text, [str(Path(root) / p) for p in paths],
                                   gold, int(r.get("level", 1))))
        if levels is not None:
            items = [it for it in items if it.level in levels]
        if not items:
            raise ValueError(f"{path}: no items")
        return items

    def build_rows(self, args, bad):
        raise NotImplementedError(f"task {self.name}: build training rows with source: mirage_jsonl "
                                  f"(data/{self.name}_sample.yaml)")


SAT = JsonlChoice("sat", "AB", paren_fallback=False)
COMT = JsonlChoice("comt", "ABCD", paren_fallback=True)

__all__ = ["COMT", "SAT", "JsonlChoice", "JsonlItem"]
