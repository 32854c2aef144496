"""Output folders: what mirage-rl may write where, and one run per folder at a time.

The rules (README, "What an output_dir may contain"):

* Every folder a command writes into holds ``mirage_output.json`` (the *manifest*): the entries mirage-rl wrote
  there (names or globs such as ``checkpoint-*``) and the *group* that wrote each one (``model``: a model save by
  ``sft``/``grpo``/``create-model``/``export``; ``dataset``; ``eval``; ``checkpoints``; ``pipeline``; ``results``;
  ``user``: entries a user let mirage-rl write beside with ``--overwrite_output_dir true``), plus the settings of the
  run that saved the model (``run``; ``pipeline`` compares them with its recipe).
* Before any work (:func:`output_dir_guard`): ``output_dir`` must be a folder or not exist yet, its nearest existing
  parent writable, and it may hold only mirage-rl's entries: those of its manifest, sub-folders with a manifest of
  their own (e.g. ``eval/`` inside a model folder) and the hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` / ``.NAME.lock``
  entries of atomic writes and locks. Anything else is refused (naming the folder and the entries) unless
  ``overwrite_output_dir``; even then it is kept.
* A save (:func:`mirage_rl.atomic.commit_directory`) replaces only what the same group wrote before; every other
  entry of the folder is kept. Nothing a user put in a folder is ever deleted.
* A finished output is never replaced by another run (:func:`check_finished`): when a command's ``with
  output_dir_guard(...)`` block ends without error, the manifest records under ``finished[GROUP]`` which command
  finished that output and with which settings. A later run that would write the same group there is refused in one
  line naming what is there, unless it is the same command with the same settings (a resume, or a re-run that writes
  the same thing) or the user passed ``--replace_output_dir true`` (``pipeline``: ``--retrain true``); a replacing run
  first marks the old output unfinished, so a killed replacement never leaves a manifest that describes weights it
  did not write. The command line that started a run is recorded (``started``), so an interrupted run can be named
  with the command that resumes it (:func:`interrupted_run_message`).
* One run per folder (:func:`run_lock`): an exclusive ``fcntl.flock`` lock (``filelock``) on the hidden sibling
  ``.NAME.lock``, held from start-up to the end of the run. The kernel drops it when the process dies, SIGKILL
  included; the holder's pid, start time and command are in ``.NAME.lock.owner`` for the message a second run gets.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .atomic import MANIFEST, atomic_write_text, group_of, read_manifest, write_manifest
from .errors import UserError

logger = logging.getLogger(__name__)

#: hidden siblings that mirage-rl itself creates beside (or inside) a folder: atomic-write temp entries, the old
#: version kept during a folder swap, locks and their owner records
_OWN_HIDDEN = re.compile(r"^\..+\.(tmp-.*|old-\d+|lock|lock\.owner)$")
#: what each group may leave in a folder while it runs (claimed at start-up, so a killed run's files are mirage-rl's)
PATTERNS = {
    "model": ("checkpoint-*", "runs", "README.md"),  # README.md: the model card TRL writes at each checkpoint
    "eval": ("report.json", "samples.jsonl", "samples.partial.jsonl", "accuracy_by_level.png", "interventions",
             "interventions.png"),
    "pipeline": ("pipeline_summary.json", "pipeline_summary.md"),
    "results": ("logs", "steps.json", "results.json", "base", "seed*"),  # base/, seedN/: folders of the runs
    "dataset": (),
}
_PATTERN_GROUP = {"checkpoint-*": "checkpoints", "runs": "checkpoints", "README.md": "checkpoints"}


#: the command line of this process's ``mirage-rl`` command (set by :func:`mirage_rl.cli.main`), named in lock owner
#: records and the manifest's ``started``; None outside the CLI (then ``sys.argv``)
COMMAND_LINE: str | None = None


def command_line() -> str:
    """The ``mirage-rl ...`` command line this process runs."""
    return COMMAND_LINE or " ".join(["mirage-rl", *sys.argv[1:]])


class OutputDirError(UserError):
    """An ``output_dir`` that cannot be used: a file, foreign entries, not writable, or in use by another run."""


def is_own_hidden(name: str) -> bool:
    """A hidden temp / old / lock entry that mirage-rl's atomic writes and locks create."""
    return bool(_OWN_HIDDEN.match(name))


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """The entries of ``folder`` that no mirage-rl run wrote there (sorted names; module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    manifest = read_manifest(folder)
    out = []
    for child in folder.iterdir():
        name = child.name
        if name == MANIFEST or is_own_hidden(name) or group_of(name, manifest) is not None:
            continue
        if child.is_dir() and (child / MANIFEST).is_file():  # a nested mirage-rl output (eval/ in a model folder)
            continue
        out.append(name)
    return sorted(out)


def _add_entries(folder: Path, new: dict, replace: bool) -> None:
    """Add ``new`` (``{name_or_glob: group}``) to the manifest of ``folder`` (``replace``: over existing entries of the
    same name); the manifest is written only when it changes or does not exist yet."""
    manifest = read_manifest(folder)
    entries = {**manifest["entries"], **new} if replace else {**new, **manifest["entries"]}
    if entries != manifest["entries"] or not (folder / MANIFEST).exists():
        write_manifest(folder, {**manifest, "entries": entries})


def claim(folder: str | os.PathLike, group: str, accepted: list[str] = ()) -> None:
    """Create ``folder`` and record in its manifest what ``group`` may leave there while it runs (``PATTERNS``), and
    the foreign entries the user accepted with ``overwrite_output_dir`` (group ``user``: kept, never deleted);
    entries already recorded keep their group."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    new = {name: "user" for name in accepted}
    new.update({p: _PATTERN_GROUP.get(p, group) for p in PATTERNS.get(group, ())})
    _add_entries(folder, new, replace=False)


def record(folder: str | os.PathLike, names, group: str) -> None:
    """Add ``names`` (written by ``group``) to the manifest of ``folder``."""
    _add_entries(Path(folder), {n: group for n in names}, replace=True)


# ------------------------------------------------------------------------------------------------ checks
def check_output_dir(path: str | os.PathLike, overwrite: bool = False, what: str = "output_dir") -> list[str]:
    """Refuse an unusable output folder before any work starts; returns the foreign entries accepted by
    ``overwrite``.

    Raises:
        OutputDirError: ``path`` (or a parent) is a file; the nearest existing parent is not writable; or ``path``
            holds entries no mirage-rl run wrote there and ``overwrite`` is False (naming the folder, the entries and
            the two ways on).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputDirError(f"{what} {p} is a file, not a folder: mirage-rl writes a folder there and never "
                             "replaces a file; pass another path")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputDirError(f"{what} {p}: {parent} is a file, so the folder cannot be created; pass another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"{what} {p}: {parent} is not writable by this user; pass a folder you can write to")
    foreign = foreign_entries(p)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise OutputDirError(f"{what} {p} holds entries that no mirage-rl run wrote there ({shown}); mirage-rl does "
                             "not mix its outputs into such a folder: choose another folder, or pass "
                             "--overwrite_output_dir true to write beside them (they are kept, never deleted)")
    return foreign


# ------------------------------------------------------------------------------------------------ finished outputs
#: what each group's finished output is called in messages
_WHAT = {"model": "model", "dataset": "dataset", "eval": "evaluation", "pipeline": "pipeline summary",
         "results": "comparison", "base": "base cache"}
#: entries that mark a group's output as written, for folders whose manifest predates ``finished``
_LEGACY_MARKERS = {"model": ("config.json", "adapter_config.json"), "dataset": ("dataset_dict.json",),
                   "eval": ("report.json",)}
#: the commands that finish outputs, and which one wrote a group's output in a folder that predates ``finished``
_COMMANDS = ("build-data", "create-model", "sft", "grpo", "eval", "export")
_LEGACY_COMMAND = {"model": "create-model", "dataset": "build-data", "eval": "eval"}
#: outputs that never share a folder (a model saved into a dataset folder would mix their files and manifests)
_EXCLUSIVE = {"model": ("dataset",), "dataset": ("model",)}
#: settings keys that never make two runs differ (where output goes, how it is shown)
_NEUTRAL_KEYS = ("output_dir", "overwrite_output_dir", "replace_output_dir", "disable_tqdm", "resume")


def finished_output(folder: str | os.PathLike, group: str) -> dict | None:
    """The finished output of ``group`` in ``folder``: ``{"command", "settings", "finished"}`` from its manifest, or
    None. Folders written before ``finished`` was recorded are read from their files and history (command and
    settings as far as they were recorded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    manifest = read_manifest(folder)
    if "finished" in manifest:
        rec = (manifest.get("finished") or {}).get(group)
        return rec if isinstance(rec, dict) else None
    if not any((folder / m).exists() for m in _LEGACY_MARKERS.get(group, ())):
        return None
    history = [h for h in manifest.get("history") or [] if isinstance(h, dict) and h.get("group") == group]
    run = manifest.get("run") if group == "model" else None
    command = (run or {}).get("command") or (history[-1].get("command") if history else None)
    if command not in _COMMANDS:  # older saves recorded "save_pretrained", or nothing
        command = _LEGACY_COMMAND.get(group, "unknown")
    return {"command": command, "settings": run, "finished": history[-1].get("finished") if history else None}


def _comparable(settings: dict | None) -> dict | None:
    if settings is None:
        return None
    return {k: v for k, v in settings.items() if k not in _NEUTRAL_KEYS}


def settings_differences(recorded: dict | None, expected: dict) -> list[str]:
    """``key: saved -> now`` for every setting that differs between a finished output and the run about to write
    the same folder; ``["unknown ..."]`` when the folder records none."""
    if not recorded:
        return ["unknown (the folder records no settings: it was written by an older mirage-rl or by hand)"]
    recorded, expected = _comparable(recorded), _comparable(expected)
    return [f"{k}: {recorded.get(k)!r} saved, {expected.get(k)!r} now" for k in sorted(set(recorded) | set(expected))
            if recorded.get(k) != expected.get(k)]


def check_finished(path: str | os.PathLike, group: str, command: str | None, settings: dict | None = None,
                   replace: bool = False, what: str = "output_dir", replace_flag: str = "--replace_output_dir true"
                   ) -> dict | None:
    """Refuse a run that would replace another run's finished output of ``group`` in ``path`` (module docstring);
    returns the finished output found (None when there is none).

    Allowed: no finished output; ``replace``; the same ``command`` with equal ``settings`` (or ``settings`` None:
    the command has nothing that could differ, e.g. a resume).

    Raises:
        OutputDirError: one line naming the folder, what is there (which command finished it, when), why this run
            would replace it (another command, or the settings that differ) and the ways on (another folder, or
            ``replace_flag``).
    """
    thing = _WHAT.get(group, group)
    for other in _EXCLUSIVE.get(group, ()) if command is not None else ():
        held = finished_output(path, other)
        if held is not None:
            raise OutputDirError(f"{what} {path} holds a finished {_WHAT[other]} written by `mirage-rl "
                                 f"{held.get('command')}`; a {thing} does not go into the same folder: choose another "
                                 f"{what}")
    rec = finished_output(path, group)
    if rec is None or replace or command is None:
        return rec
    when = f", finished {rec['finished']}" if rec.get("finished") else ""
    if rec.get("command") != command:
        why = f"`mirage-rl {command}` would replace it with its own output"
    else:
        if settings is None:
            return rec
        diff = settings_differences(rec.get("settings"), settings)
        if not diff:
            return rec
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        why = f"this run's settings differ ({shown})"
    raise OutputDirError(f"{what} {path} holds a finished {thing} written by `mirage-rl {rec.get('command')}`{when}; "
                         f"{why}: choose another {what}, or pass {replace_flag} to replace it (only the files of that "
                         f"{thing} are replaced; everything else in the folder is kept)")


def _mark(folder: Path, key: str, group: str, value) -> None:
    manifest = read_manifest(folder)
    table = dict(manifest.get(key) or {})
    table[group] = value
    out = {**manifest, key: table}
    if key == "finished" and value is None and group == "model":
        out.pop("run", None)  # the old model's settings must not outlive its replacement's start
    write_manifest(folder, out)


# ------------------------------------------------------------------------------------------------ checkpoints
#: a checkpoint counts only once this marker is written, after every file of its save (trainers/checkpointing.py)
COMPLETE_MARKER = "mirage_checkpoint.json"
#: ``checkpoint-N``: transformers' ``PREFIX_CHECKPOINT_DIR``, as in ``PATTERNS["model"]`` (a test holds them equal)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """True when ``checkpoint`` holds the completion marker."""
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """``(complete, incomplete)`` ``checkpoint-N`` folders that mirage-rl runs wrote in ``output_dir``, each sorted
    by step. A ``checkpoint-N`` the user put there (accepted with ``--overwrite_output_dir``: group ``user`` in the
    manifest) is none of them: never resumed from, rotated away or called incomplete."""
    out = Path(output_dir)
    if not out.is_dir():
        return [], []
    manifest = read_manifest(out)
    found = sorted((p for p in out.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)
                    and group_of(p.name, manifest) != "user"),
                   key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))
    return [p for p in found if is_complete(p)], [p for p in found if not is_complete(p)]


def interrupted_run_message(folder: str | os.PathLike) -> str | None:
    """For a folder that holds no finished model but a run's checkpoints: ``FOLDER holds no finished model: the run
    `CMD` (started T) was interrupted; its last complete checkpoint is checkpoint-N: resume it by running that command
    again, or use --model FOLDER/checkpoint-N``; None for any other folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    complete, incomplete = list_checkpoints(folder)
    if not complete and not incomplete:
        return None
    started = (read_manifest(folder).get("started") or {}).get("model") or {}
    cmd = started.get("command")
    run = f"the run `{cmd}` (started {started.get('started')})" if cmd else "the run that writes it"
    if complete:
        last = complete[-1]
        return (f"{folder} holds no finished model: {run} was interrupted; its last complete checkpoint is "
                f"{last.name}: resume it by running {'that command' if cmd else 'the same command'} again, or use "
                f"--model {last}")
    return (f"{folder} holds no finished model: {run} was interrupted before its first complete checkpoint; run "
            f"{'that command' if cmd else 'it'} again")


# ------------------------------------------------------------------------------------------------ locks
_HELD: dict[str, int] = {}


def lock_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(.NAME.lock, .NAME.lock.owner)`` beside ``path``."""
    p = Path(os.path.abspath(path))
    return p.with_name(f".{p.name}.lock"), p.with_name(f".{p.name}.lock.owner")


def _describe_owner(owner_file: Path) -> str:
    try:
        o = json.loads(owner_file.read_text())
        return f"pid {o['pid']} on {o['host']}, started {o['started']}: {o['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


@contextmanager
def run_lock(path: str | os.PathLike, command: str | None = None):
    """Hold the exclusive run lock of the folder ``path`` (module docstring) for the ``with`` block. Re-entrant
    within one process (a pipeline's stage inside the pipeline).

    Raises:
        OutputDirError: another run holds the lock (naming the folder and that run's pid, start time and command).
    """
    from filelock import FileLock, Timeout

    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock_file, owner_file = lock_paths(path)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputDirError(f"{path} is in use by another mirage-rl run ({_describe_owner(owner_file)}); wait for it "
                             "to end or use another output_dir") from None
    atomic_write_text(owner_file, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command or command_line()}) + "\n")
    _HELD[key] = 1
    try:
        yield
    finally:
        _HELD.pop(key, None)
        lock.release()


def is_main_rank() -> bool:
    """Rank 0 of a ``torchrun`` / ``accelerate launch`` job (or a plain process): the one that checks, locks and
    records output folders."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def output_dir_guard(path: str | os.PathLike, group: str, overwrite: bool = False, what: str = "output_dir",
                     command: str | None = None, producer: str | None = None, settings: dict | None = None,
                     replace: bool = False, replace_flag: str = "--replace_output_dir true"):
    """Check ``path`` (:func:`check_output_dir`, and :func:`check_finished` when ``producer``, the sub-command, is
    given) on every rank, then, on rank 0 only, lock it (:func:`run_lock`) and claim it (:func:`claim`) for the
    ``with`` block (the other ranks of a distributed job run inside rank 0's lock). When the block ends without error, ``producer`` and
    ``settings`` are recorded as the folder's finished output of ``group``. ``command``: the command line named in
    the lock's owner record and the manifest's ``started`` (default: this process's). Yields the finished output
    of ``group`` already in ``path`` that this run may write over (:func:`check_finished`; None when there is none):
    with ``producer`` and without ``replace``, one of the same command and settings."""
    # the read-only checks run on every rank, so that each rank of a refused distributed run stops with the same
    # line (a rank that went on alone would die later in a collective with a connection error)
    check_output_dir(path, overwrite, what)  # fast refusal before taking the lock
    previous = check_finished(path, group, producer, settings, replace, what, replace_flag)
    if not is_main_rank():
        yield previous
        return
    with run_lock(path, command):
        accepted = check_output_dir(path, overwrite, what)  # again, now that no other run can write there
        if accepted:
            logger.warning("%s %s: writing beside %d entries mirage-rl did not write (%s); they are kept", what, path,
                           len(accepted), ", ".join(accepted[:8]))
        previous = check_finished(path, group, producer, settings, replace, what, replace_flag)
        existed = Path(path).exists()
        claim(path, group, accepted)
        folder = Path(path)
        if producer is not None:
            if previous is not None and replace:
                logger.info("%s %s: replacing the finished %s written by `mirage-rl %s`", what, path,
                            _WHAT.get(group, group), previous.get("command"))
                _mark(folder, "finished", group, None)
            _mark(folder, "started", group, {"command": command or command_line(),
                                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        try:
            yield previous
            if producer is not None and folder.is_dir():
                _mark(folder, "finished", group, {"command": producer, "settings": settings,
                                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        except BaseException:
            # a run that failed before writing anything leaves no folder behind (only the one it created)
            folder = Path(path)
            if not existed and folder.is_dir() and {c.name for c in folder.iterdir()} <= {MANIFEST}:
                (folder / MANIFEST).unlink(missing_ok=True)
                folder.rmdir()
            raise
