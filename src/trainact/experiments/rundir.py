"""Run directories: each belongs to one job, one process uses it at a time, nothing in it is lost.

The first job given a directory claims it: ``job.json`` records the job's kind (``train``,
``compare``, ``sweep``) and identity (its configuration, seeds, budgets). Any other job is
refused, naming the directory and its owner; the same kind with another identity is refused
naming each differing field. ``job.json`` also records where the job ran (``environment``:
versions, device, threads; updated by a resume, never compared). While a job runs it holds an
exclusive lock on ``job.lock`` (``filelock``: ``flock`` on POSIX, ``msvcrt`` locking on
Windows), which the system drops when the process ends however it ends: a second job on the
directory is refused at once, naming the holder written in ``job.owner``, and a killed one
leaves no stale lock.

Logs are JSON lines, appended one record at a time and otherwise only rewritten atomically
(:func:`write_atomic`, the one way every file of the experiments is replaced: a temporary file
in the same directory renamed over the old one). Reading is strict: an unfinished last line is
the record that was being written when a job was killed and is dropped; any other bad line is
an error naming the file and line. File-system errors name the path (a full disk's error names
none by itself).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock, Timeout

JOB_FILE = "job.json"
LOCK_FILE = "job.lock"
OWNER_FILE = "job.owner"
_TMP_SUFFIX = ".tmp"


@contextmanager
def claim(
    out: str | os.PathLike[str],
    kind: str,
    identity: dict[str, Any],
    *,
    resume: bool = True,
    mutable: Collection[str] = (),
    env: dict[str, Any] | None = None,
) -> Iterator[bool]:
    """Hold ``out`` for a job of ``kind`` and ``identity`` (a JSON-able dict) for a ``with``
    block; yields True when the directory already held this job (a resume).

    ``identity`` values that are dicts (a configuration) are compared field by field; fields in
    ``mutable`` (where a run is computed, not what) may differ and are updated in ``job.json``.
    ``env`` (JSON-able: versions, device, threads) is recorded as its ``environment``.

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
    recorded = {**current, **({"environment": json.loads(json.dumps(env))} if env else {})}
    with _locked(out, kind):
        saved = read_job(out)
        if saved is None:
            leftovers = sorted(
                p.name
                for p in out.iterdir()
                if p.name not in (LOCK_FILE, OWNER_FILE) and not p.name.endswith(_TMP_SUFFIX)
            )
            if leftovers:
                raise FileExistsError(
                    f"{out} holds files of no trainact job ({', '.join(leftovers[:4])}"
                    f"{', ...' if len(leftovers) > 4 else ''}) and no {JOB_FILE}; "
                    "choose another --out"
                )
            write_json(out / JOB_FILE, recorded)
            yield False
            return
        _check_kind(out, saved, kind)
        if not resume:
            raise FileExistsError(
                f"{out} already holds a {kind} run; resume it (--resume) or choose another --out"
            )
        saved_env = saved.pop("environment", None)
        changed = differences(saved, current, mutable)
        if changed:
            raise ValueError(
                f"{out} holds a {kind} job of another configuration ({'; '.join(changed)}); "
                "rerun with the saved values or choose another --out"
            )
        if saved != current or (env and saved_env != recorded.get("environment")):
            write_json(out / JOB_FILE, recorded if env else {**current, "environment": saved_env})
        yield True


def saved_job(out: str | os.PathLike[str], kind: str) -> dict[str, Any]:
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


def read_job(out: Path) -> dict[str, Any] | None:
    """``out/job.json`` as a dict, None when absent; ValueError naming the file when corrupt."""
    path = out / JOB_FILE
    if not path.exists():
        return None
    job = read_json(path)
    if not isinstance(job, dict) or not isinstance(job.get("kind"), str):
        raise ValueError(f"{path} names no job kind: not a job file of this trainact version")
    return job


def _check_kind(out: Path, saved: dict[str, Any], kind: str) -> None:
    if saved["kind"] != kind:
        raise FileExistsError(
            f"{out} belongs to a {saved['kind']} job (see {out / JOB_FILE}); "
            f"a {kind} cannot use it: choose another --out"
        )


def differences(
    saved: dict[str, Any], current: dict[str, Any], mutable: Collection[str] = ()
) -> list[str]:
    """``"field: saved value, given value"`` for every field that differs, nested dicts
    flattened (a configuration's fields are named alone)."""
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{k}: saved {_show(old, k)}, given {_show(new, k)}"
        for k in sorted(old.keys() | new.keys(), key=[*old, *new].index)
        if k not in mutable and old.get(k, _UNSET) != new.get(k, _UNSET)
    ]


_UNSET = object()


def _flatten(job: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in job.items():
        flat.update(v if isinstance(v, dict) else {k: v})
    return flat


def _show(values: dict[str, Any], key: str) -> str:
    return json.dumps(values[key]) if key in values else "(unset)"


@contextmanager
def _locked(out: Path, kind: str) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``out/job.lock``; ``out/job.owner`` names its holder."""
    path, owner = out / LOCK_FILE, out / OWNER_FILE
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = owner.read_text().strip()
        except OSError:
            holder = ""
        raise FileExistsError(
            f"{out} is in use by another trainact job ({holder or 'another process'}); wait for "
            "it to end or choose another --out"
        ) from None
    except OSError as err:
        raise named(err, path) from err
    try:
        write_atomic(owner, f"{kind}, pid {os.getpid()}\n")
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# Files: strict reading, atomic rewriting, errors that name the path.


def named(err: OSError, path: str | os.PathLike[str]) -> OSError:
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def write_atomic(path: Path, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` at once by ``content`` (text, bytes, or a function writing to a binary
    file): readers, and a writer killed midway, see the old file or the new one, never a part.

    The temporary file lies beside ``path`` (``.NAME.<random>.tmp``) and is removed when
    writing fails; the error names ``path`` (a RuntimeError of the writer, as ``torch.save``
    reports a full disk, becomes an OSError naming it). Anything else the writer raises (a
    checksum mismatch, say) also removes it and propagates as it is.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
    try:
        with tmp.open("xb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise named(err, path) from err
        if isinstance(err, RuntimeError):
            raise OSError(f"cannot write {path}: {str(err).splitlines()[0]}") from err
        raise


def write_json(path: Path, obj: object) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line (one write: a kill leaves at most an unfinished last line)."""
    try:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise named(err, path) from err
