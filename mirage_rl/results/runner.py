"""Running the plan: ``jobs`` steps at a time in dependency order, each finished step recorded and never rerun."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from .arguments import ResultsArguments
from .plan import Step
from ..data.jsonl import read_json

logger = logging.getLogger(__name__)


class StepLog:
    """``output_root/steps.json``: the finished steps (argv, wall seconds, threads), rewritten atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict] = read_json(path) if path.exists() else {}

    def done(self, step: Step) -> bool:
        return step.key in self.steps and Path(step.done_file).exists()

    def record(self, step: Step, wall_s: float, threads: int) -> None:
        """Record a finished step with the commit of the code that ran it (``machine.git_commit``)."""
        from .machine import git_commit

        self.steps[step.key] = {"argv": step.argv, "wall_s": round(wall_s, 1), "threads": threads,
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "commit": git_commit(Path(__file__).resolve().parents[2])}
        atomic_write_text(self.path, json.dumps(self.steps, indent=2) + "\n")


def run_step(step: Step, root: Path, threads: int) -> float:
    """Run one step as ``python -m mirage_rl ...`` with its output in ``root/logs/{key}.log``; returns wall seconds.

    Raises:
        RuntimeError: the step failed; the message names the command, its log and the log's last lines.
    """
    log = root / "logs" / f"{step.key.replace('/', '__')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "mirage_rl", *step.argv], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{step.key} failed (exit {rc}): mirage-rl {shlex.join(step.argv)}\nlog: {log}\n{tail}")
    return wall


def execute(args: ResultsArguments, steps: list[Step], on_eval=None) -> StepLog:
    """Run the unfinished steps, ``args.jobs`` at a time in dependency order; ``on_eval()`` after each evaluation."""
    root = Path(args.output_root)
    root.mkdir(parents=True, exist_ok=True)
    log = StepLog(root / "steps.json")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    todo = {s.key: s for s in steps if not log.done(s)}
    finished = {s.key for s in steps if s.key not in todo}
    bar = tqdm(total=len(steps), initial=len(finished), desc="results", unit="step")
    running: dict = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while todo or running:
            for key, s in list(todo.items()):
                if len(running) < args.jobs and all(n in finished for n in s.needs):
                    logger.info("results: start %s: mirage-rl %s", key, shlex.join(s.argv))
                    running[pool.submit(run_step, s, root, threads)] = s
                    del todo[key]
            if not running:
                raise RuntimeError(f"results: steps {sorted(todo)} wait on steps that are not in the plan")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                s = running.pop(fut)
                wall = fut.result()  # a failure propagates (the finished steps stay recorded)
                log.record(s, wall, threads)
                finished.add(s.key)
                bar.update(1)
                logger.info("results: %s done in %.0f s", s.key, wall)
                if "/eval_" in s.key and on_eval is not None:
                    on_eval(log)
    bar.close()
    return log
