"""Run directories: each belongs to one job, one process uses it at a time, nothing in it is lost.

The first job given a directory claims it: ``job.json`` records the job's kind (``train``,
``compare``, ``sweep``) and identity (its configuration, seeds, budgets). Any other job is
refused, naming the directory and its owner; the same kind with another identity is refused
naming each differing field. While a job runs it holds an exclusive ``flock`` on ``job.lock``,
which the kernel drops when the process ends however it ends: a second job on the directory is
refused at once, and a killed one leaves no stale lock.

Logs are JSON lines, appended one record at a time and otherwise only rewritten atomically (a
temporary file renamed over the old one). Reading is strict: an unfinished last line is the record
that was being written when a job was killed and is dropped; any other bad line is an error naming
the file and line. File-system errors name the path (a full disk's error names none by itself).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

JOB_FILE = "job.json"
LOCK_FILE = "job.lock"
_TMP_SUFFIX = ".tmp"


@contextmanager
def claim(
    out: str | os.PathLike,
    kind: str,
    identity: dict,
    *,
    resume: bool = True,
    mutable: Collection[str] = (),
) -> Iterator[bool]:
    """Hold ``out`` for a job of ``kind`` and ``identity`` (a JSON-able dict) for a ``with``
    block; yields True when the directory already held this job (a resume).

    ``identity`` values that are dicts (a configuration) are compared field by field; fields in
    ``mutable`` (where a run is computed, not what) may differ and are updated in ``job.json``.

    Raises:
        FileExistsError: ``out`` is in use by another process, belongs to another kind of job,
            holds files but no ``job.json``, or holds this job and ``resume`` is False.
        ValueError: ``out`` holds a job of this kind with other values (each field named, with
            the saved and the given value), or a corrupt ``job.json``.
        OSError: the directory or its files cannot be created or written (the path is named).
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise named(err, out) from err
    current = json.loads(json.dumps({"kind": kind, **identity}))
    with _locked(out, kind):
        saved = read_job(out)
        if saved is None:
            leftovers = sorted(
                p.name
                for p in out.iterdir()
                if p.name != LOCK_FILE and not p.name.endswith(_TMP_SUFFIX)
            )
            if leftovers:
                raise FileExistsError(
                    f"{out} holds files of no trainact job ({', '.join(leftovers[:4])}"
                    f"{', ...' if len(leftovers) > 4 else ''}) and no {JOB_FILE}; "
                    "choose another --out"
                )
            write_json(out / JOB_FILE, current)
            yield False
            return
        _check_kind(out, saved, kind)
        if not resume:
            raise FileExistsError(
                f"{out} already holds a {kind} run; resume it (--resume) or choose another --out"
            )
        changed = differences(saved, current, mutable)
        if changed:
            raise ValueError(
                f"{out} holds a {kind} job of another configuration ({'; '.join(changed)}); "
                "rerun with the saved values or choose another --out"
            )
        if saved != current:
            write_json(out / JOB_FILE, current)
        yield True


def saved_job(out: str | os.PathLike, kind: str) -> dict:
    """The ``job.json`` of the ``kind`` job in ``out``, for a resume that reuses its values.

    Raises:
        FileNotFoundError: ``out`` holds no job (a misspelled directory is not a fresh start).
        FileExistsError: ``out`` belongs to another kind of job.
        ValueError: ``job.json`` is corrupt.
    """
    out = Path(out)
    saved = read_job(out)
    if saved is None:
        raise FileNotFoundError(f"{out} holds no {kind} run to resume (no {out / JOB_FILE})")
    _check_kind(out, saved, kind)
    return saved


def read_job(out: Path) -> dict | None:
    """``out/job.json`` as a dict, None when absent; ValueError naming the file when corrupt."""
    path = out / JOB_FILE
    if not path.exists():
        return None
    job = read_json(path)
    if not isinstance(job, dict) or not isinstance(job.get("kind"), str):
        raise ValueError(f"{path} names no job kind: not a job file of this trainact version")
    return job


def _check_kind(out: Path, saved: dict, kind: str) -> None:
    if saved["kind"] != kind:
        raise FileExistsError(
            f"{out} belongs to a {saved['kind']} job (see {out / JOB_FILE}); "
            f"a {kind} cannot use it: choose another --out"
        )


def differences(saved: dict, current: dict, mutable: Collection[str] = ()) -> list[str]:
    """``"field: saved value, given value"`` for every field that differs, nested dicts
    flattened (a configuration's fields are named alone)."""
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{k}: saved {_show(old, k)}, given {_show(new, k)}"
        for k in sorted(old.keys() | new.keys(), key=[*old, *new].index)
        if k not in mutable and old.get(k, _UNSET) != new.get(k, _UNSET)
    ]


_UNSET = object()


def _flatten(job: dict) -> dict:
    flat = {}
    for k, v in job.items():
        flat.update(v if isinstance(v, dict) else {k: v})
    return flat


def _show(values: dict, key: str) -> str:
    return json.dumps(values[key]) if key in values else "(unset)"


@contextmanager
def _locked(out: Path, kind: str) -> Iterator[None]:
    """An exclusive, non-blocking flock on ``out/job.lock``, which names its holder."""
    path = out / LOCK_FILE
    try:
        f = path.open("a+")
    except OSError as err:
        raise named(err, path) from err
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FileExistsError(
                f"{out} is in use by another trainact job ({holder}); wait for it to end or "
                "choose another --out"
            ) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{kind}, pid {os.getpid()}")
            f.flush()
        except OSError as err:
            raise named(err, path) from err
        yield


# ---------------------------------------------------------------------------------------------
# Files: strict reading, atomic rewriting, errors that name the path.


def named(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` naming ``path`` (writing to a full disk fails without a file name)."""
    if err.errno is None:
        return OSError(f"{path}: {err}")
    return OSError(err.errno, err.strerror, os.fspath(path))


def read_json(path: Path) -> object:
    """A JSON file; ValueError naming the file and line when it does not parse."""
    try:
        text = path.read_text()
    except OSError as err:
        raise named(err, path) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: corrupt JSON ({err.msg})") from None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log. An unfinished or unparseable last line is the record that
    was being written when a job was killed and is dropped; any other bad line is an error."""
    try:
        text = path.read_text()
    except OSError as err:
        raise named(err, path) from err
    lines = text.split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for n, line in numbered:
        last = n == numbered[-1][0]
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if last:
                break
            raise ValueError(
                f"{path}, line {n}: corrupt record ({err.msg}); repair or delete the line"
            ) from None
        if last and n == len(lines):
            break  # no newline yet: the write was cut short
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {n}: a record must be a JSON object, got {line!r}")
        records.append(record)
    return records


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once: readers and a killed writer see the old or the new."""
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise named(err, path) from err


def write_json(path: Path, obj: object) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as one line (one write: a kill leaves at most an unfinished last line)."""
    try:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise named(err, path) from err
