"""Bounded inputs (issue 16, part 3): huge text fields, max_length before tokenizing, non-UTF-8 bytes and fields of the
wrong type each get one clear error naming the file and line, or a counted skip under skip_bad_rows."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mirage_rl.collator import LatentCollator
from mirage_rl.data.build import BuildDataArguments, build_dataset
from mirage_rl.modeling import LatentTokens
from mirage_rl.commands.sft import SFTScriptArguments, check_sft_dataset, load_train_split
from mirage_rl.trainers import MirageSFTConfig

GOOD_VSP_ROW = {"map_desc": [[1, 0, 0], [0, -1, 0], [0, 0, 2]], "text_output": "\\boxed{RIGHT, RIGHT, DOWN, DOWN}",
                "level": 3, "map_id": "ok"}


def mirage_rows(tmp_path, rows):
    Image.new("RGB", (192, 192), (200, 220, 255)).save(tmp_path / "map.png")
    base = {"text_input": "Here is the map: <image> Solve it.", "image_input": "map.png", "image_output": "map.png",
            "text_output": "<think>look</think><output_image>\\boxed{A}"}
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))
    return jsonl


def build(jsonl, tmp_path, **kw):
    return build_dataset(BuildDataArguments(source="mirage_jsonl", jsonl=str(jsonl),
                                            output_dir=str(tmp_path / "built"), **kw))


def vsp_build(vsp_dir, tmp_path, jsonl, **kw):
    return build_dataset(BuildDataArguments(output_dir=str(tmp_path / "built"), train_jsonl=str(jsonl),
                                            test_dir=str(vsp_dir / "maze_planning"), **kw))


def test_a_50_mb_text_field_is_refused_at_build_time_or_skipped(tmp_path):
    huge = "x" * 50_000_000 + "<output_image>\\boxed{A}"
    jsonl = mirage_rows(tmp_path, [{}, {"text_output": huge}])
    with pytest.raises(ValueError, match=r"rows.jsonl:2: field 'text_output' has 50000023 characters, more than "
                                         r"max_text_chars=20000; shorten the row or raise max_text_chars"):
        build(jsonl, tmp_path)
    _, counts = build(jsonl, tmp_path, skip_bad_rows=True)
    assert counts["train"] == 1 and counts["skipped_rows"] == 1 and "max_text_chars" in counts["skip_reasons"][0]


def test_max_length_has_a_safe_default_checked_before_tokenizing(tiny, rows_of, save_rows, tmp_path):
    model, processor = tiny
    assert MirageSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).max_length == 8192
    row = rows_of(1)[0]
    row["answer"] = "<output_image>" + "\\boxed{UP}" * 5_000_000  # 50 MB: the tokenizer would take all the memory

    def never(*a, **k):
        raise AssertionError("the row was tokenized")

    collator = LatentCollator(processor, LatentTokens.from_config(model.config), max_length=8192)
    collator.processor = type("P", (), {"tokenizer": processor.tokenizer, "image_processor": processor.image_processor,
                                        "apply_chat_template": processor.apply_chat_template, "__call__": never})()
    with pytest.raises(ValueError, match=r"row 0 \(map_id=.*\): 500\d{5} characters cannot fit in max_length=8192 "
                                         r"tokens \(refused before tokenizing\)"):
        collator([row])
    # at start-up, before the model is loaded, the training split is checked the same way
    ds = load_train_split(SFTScriptArguments(dataset_path=str(save_rows([rows_of(2)[0], row]))))
    args = MirageSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, stage=2)
    with pytest.raises(ValueError, match=r"d row 1 \(map_id=.*\): answer has 50000014 characters, more than "
                                         r"max_length=8192 tokens can hold"):
        check_sft_dataset(ds, args, "d", processor)


def test_non_utf8_bytes_name_the_file_and_line_or_are_a_counted_skip(vsp_dir, tmp_path):
    jsonl = tmp_path / "train.jsonl"
    bad = json.dumps({**GOOD_VSP_ROW, "map_id": "caf\u00e9"}).replace("caf\\u00e9", "caf\u00e9").encode("latin-1")
    jsonl.write_bytes(json.dumps(GOOD_VSP_ROW).encode() + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte \d+ of the line\); "
                                         "re-encode the file as UTF-8"):
        vsp_build(vsp_dir, tmp_path, jsonl)
    _, counts = vsp_build(vsp_dir, tmp_path, jsonl, skip_bad_rows=True)
    assert counts["train"] == 1 and counts["skipped_rows"] == 1 and "not valid UTF-8" in counts["skip_reasons"][0]


@pytest.mark.parametrize("source", ["vsp", "mirage_jsonl"])
def test_a_field_of_the_wrong_type_gets_the_row_message_and_the_skip(source, vsp_dir, tmp_path):
    if source == "vsp":
        jsonl = tmp_path / "train.jsonl"
        jsonl.write_text(json.dumps(GOOD_VSP_ROW) + "\n" + json.dumps({**GOOD_VSP_ROW, "text_output": 123}) + "\n")
        run = lambda **kw: vsp_build(vsp_dir, tmp_path, jsonl, **kw)  # noqa: E731
    else:
        jsonl = mirage_rows(tmp_path, [{}, {"text_output": 123}])
        run = lambda **kw: build(jsonl, tmp_path, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=rf"{jsonl.name}:2: field 'text_output' must be a string, got int '123'; "
                                         "fix the row"):
        run()
    _, counts = run(skip_bad_rows=True)
    assert counts["train"] == 1 and counts["skipped_rows"] == 1 and "must be a string" in counts["skip_reasons"][0]
