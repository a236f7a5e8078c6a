"""The GPU check: cost, accuracy, the device tests and one short training comparison on one
device, within a time budget, that cannot waste its run: it fails in seconds when it cannot
start, runs what matters most first, and writes its Markdown report and JSON twin after every
part.

    python benchmarks/gpu_check.py --dataset .gpu/cifar10-jpeg.tar.gz   # CUDA: about 6 minutes
    python benchmarks/gpu_check.py --dry-run --device cpu                # every part, tiny

First a **pre-flight** (seconds, before any GPU work): the dataset file given with
``--dataset``, the packages each part needs (torchvision and torch_tract on a GPU), the
benchmark scripts and CUDA itself; a missing one ends the run with exit status 2 and a report
that names it. Then its parts, in this order (``--parts`` runs a subset, e.g. a rerun within
the device time left):

1. ``cost``: ``benchmarks/overhead.py`` (the ImageNet stem against ``torch_tract``; training
   steps of torchvision's ResNet-50 and ViT-B/16 at batch 256, bf16 autocast, channels_last,
   with and without TrAct), each path of the precision policy side by side (default, float32:
   the split product, float64), and ``benchmarks/op_count.py``'s operation, traffic and
   memory counts beside the times;
2. ``accuracy``: ``benchmarks/accuracy.py``, strict float32 (with two inputs whose statistics
   take many chunks) and with TF32 allowed;
3. ``tests``: ``pytest --device cuda`` on the device tests (the correctness tests against
   float64 references: layer families, accuracy at every input scale on every path, the split
   product's exact parts in the worst case, half precision, never-silent probes), with a JUnit
   report;
4. ``compile``: the long tests: ``torch.compile``, autocast, GradScaler, checkpointing, host
   synchronization (``tests/nn/test_training_machinery.py``) and the model zoos;
5. ``compare``: ``trainact compare --preset resnet18-cifar10-sgd`` (one seed, bf16) at the
   largest epoch budget that fits the time left, estimated from a timed first epoch.

Each part runs in child processes and gets a share of ``--budget`` (on a GPU 360 s: 110, 40,
90, 60 and 60 s; shares scale with ``--budget`` and ``--parts``); a part that runs over its
share is stopped (pytest with SIGINT, so that its JUnit report still lists every test it ran)
and reported as stopped. The report (``--out``, default gpu_report.md) and its JSON twin (same
name, ``.json``) are written, and copied to ``$OUT`` when that variable is set with the tests'
JUnit reports and part 5's results and plot, after the pre-flight and after every part: a run
cut off keeps what it measured. Exit status 2 when the pre-flight failed, 1 when a test failed,
a benchmark missed a target or a part broke (a part stopped at its time limit is reported, and
is no failure).

The GPU targets of the cost part (recorded, judged on a GPU only): the stem's extra time at
most ``torch_tract``'s, a ResNet-50 step at most 1.02 times and a ViT-B/16 step at most 1.01
times the plain one. Without CUDA the dry run is automatic: the same parts and the same code at
tiny sizes, on the CPU, with the CIFAR ResNet-tiny and ViT-tiny of ``trainact.experiments`` in
place of torchvision's models (``tests/benchmarks/test_gpu_check.py`` runs it in CI, ``--device
cpu``). ``benchmarks/gpu_run.sh`` prepares the folder that travels to a lent GPU machine and
holds the exact device command.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

import trainact
from trainact.maths.precision import precision_for

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
PARTS = {
    "cost": "Cost: the stem against torch_tract, ResNet-50 and ViT-B/16 steps, kernels counted",
    "accuracy": "Accuracy at every input scale (benchmarks/accuracy.py)",
    "tests": "Device tests",
    "compile": "The long tests: torch.compile, training machinery, model zoos",
    "compare": "A first GPU point on the paper's model (trainact compare)",
}
COMPARE_SECONDS = 180  # part 5: training time of both methods together, at most
#: The cost part's targets on a GPU (issue 21): the stem's extra time over torch_tract's, and
#: each model's step time with TrAct over without.
GPU_TARGETS = {"stem": 1.0, "torchvision:resnet50": 1.02, "torchvision:vit_b_16": 1.01}

# The device tests, most important first: a run stopped at its time limit loses the last.
DEVICE_TESTS = (
    "tests/nn/test_layer.py",
    "tests/nn/test_adapters.py",
    "tests/nn/test_accuracy.py",
    "tests/maths/test_statistics.py",
    "tests/maths/test_precision.py",
    "tests/maths/test_solve.py",
    "tests/maths/test_rows.py",
    "tests/nn/test_never_silent.py",
    "tests/nn/test_step_guard.py",
    "tests/nn/test_discovery.py",
)
# The long ones, last: compiling, and the model zoos.
COMPILE_TESTS = ("tests/nn/test_training_machinery.py", "tests/nn/test_discovery_zoo.py")


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the full GPU check, or the tiny dry run. Only this differs."""

    tests: tuple[str, ...]  # pytest's arguments, part 3
    compile: tuple[str, ...]  # pytest's arguments, part 4
    cost: tuple[str, ...]  # benchmarks/overhead.py's arguments
    op_count: tuple[str, ...]  # benchmarks/op_count.py's arguments
    accuracy: tuple[str, ...]  # benchmarks/accuracy.py's arguments
    seconds: dict[str, float]  # each part's share of the budget (compare: the rest)
    compare_args: tuple[str, ...]  # extra arguments of the two trainact runs
    compare_max_epochs: int
    judge_cost: bool  # whether the cost targets are judged (not at tiny sizes)
    needs: tuple[str, ...]  # the modules the parts import (checked by the pre-flight)


GPU = Sizes(
    tests=DEVICE_TESTS,
    compile=COMPILE_TESTS,
    cost=tuple(
        "--batch 256 --step-batch 256 --amp bf16 --channels-last --rounds 2 --repeats 10 "
        "--only stem step --model torchvision:resnet50 torchvision:vit_b_16".split()
    ),
    op_count=("--batch", "256"),
    accuracy=tuple("--matmuls strict tf32 --many-chunks 1024".split()),
    seconds={"cost": 110, "accuracy": 40, "tests": 90, "compile": 60, "compare": 60},
    compare_args=("--amp", "bf16"),
    compare_max_epochs=200,
    judge_cost=True,
    needs=("numpy", "PIL", "matplotlib", "pytest", "hypothesis", "torchvision", "torch_tract"),
)
DRY = Sizes(
    tests=(
        "tests/test_testing.py::test_relative_error",
        "tests/nn/test_layer.py::test_channels_last_input_and_weights",
        "tests/maths/test_statistics.py::test_int8_products_are_exact_in_the_worst_case",
    ),
    compile=(
        "tests/nn/test_training_machinery.py::test_checkpoint_neither_double_counts_nor_mispairs",
        "tests/nn/test_training_machinery.py::test_no_host_synchronization_is_added_to_a_training_step",
    ),
    cost=tuple(
        "--batch 1 --step-batch 4 --rounds 1 --repeats 1 --only stem step "
        "--model resnet-tiny vit-tiny".split()
    ),
    op_count=("--batch", "8"),
    accuracy=("--matmuls", "strict", "tf32", "--cases", "3x3/1|Linear on", "--many-chunks", "16"),
    seconds={"cost": 90, "accuracy": 90, "tests": 90, "compile": 90, "compare": 150},
    compare_args=("--model", "resnet-tiny", "--eval-batch-size", "500", "--train-subset", "200"),
    compare_max_epochs=1,
    judge_cost=False,
    needs=("numpy", "PIL", "matplotlib", "pytest", "hypothesis"),
)
#: Every run of benchmarks/overhead.py: each path's cost, in this process (no process starts).
OVERHEAD_COMMON = ("--statistics-dtype", "default", "float32", "float64", "--in-process")


@dataclass
class Part:
    """One part's outcome: ``status`` is pass, fail, stopped (its time ran out) or skip."""

    name: str
    status: str = "pass"
    seconds: float = 0.0
    commands: list[str] = field(default_factory=list)
    summary: str = ""
    problems: list[str] = field(default_factory=list)
    markdown: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What every part needs: device, sizes, the deadline, a scratch folder."""

    device: torch.device
    sizes: Sizes
    dry_run: bool
    end: float  # monotonic deadline of the whole run
    work: Path
    dataset: str
    parts: list[str]
    budget: float
    keep: list[tuple[Path, str]] = field(default_factory=list)  # files to copy to $OUT
    decoding: tuple[subprocess.Popen[str], IO[str]] | None = None

    def share(self, part: str) -> float:
        """``part``'s share of the budget: its seconds, scaled to the budget of these parts."""
        return (
            self.sizes.seconds[part] * self.budget / sum(self.sizes.seconds[p] for p in self.parts)
        )

    def limit(self, part: str) -> float:
        """Seconds ``part`` may run: its share, less what the later parts' shares lack (compare,
        the last: all that is left)."""
        left = self.end - time.monotonic()
        later = self.parts[self.parts.index(part) + 1 :]
        if not later:
            return max(left, 1.0)
        return max(min(self.share(part), left - sum(self.share(p) for p in later)), 1.0)

    def shown(self, cmd: list[str]) -> str:
        """A command as the report shows it: ``python`` and paths relative to the repository."""
        text = " ".join(["python", *cmd[1:]] if cmd[0] == sys.executable else cmd)
        return text.replace(str(self.work), "<tmp>").replace(str(ROOT) + os.sep, "")


def child_env() -> dict[str, str]:
    """The environment of a child process that imports the trainact this script imports."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    src = str(Path(trainact.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def run_child(cmd: list[str], limit: float, interrupt: bool = False) -> tuple[int, bool, str]:
    """Run ``cmd`` from the repository's root, its output echoed as it comes; past ``limit``
    seconds it is stopped (SIGINT first where ``interrupt``, so that it can still write what
    it has). Returns the exit status, whether it was stopped, and the output."""
    child = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: list[str] = []

    def echo() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            print(f"  | {line}", end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    stopped = False
    try:
        child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        stopped = True
        if interrupt:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        else:
            child.kill()
        child.wait()
    reader.join(timeout=10)
    return child.returncode, stopped, "".join(lines)


def _last_line(text: str) -> str:
    """The last line of a child's output: the exception or the CLI's error message."""
    return (text.strip().splitlines() or ["(no output)"])[-1][:500]


def _fmt(x: float | None, spec: str = ".1e") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---- part 1: cost ---------------------------------------------------------------------------


def _benchmark(
    run: Run, part: Part, script: str, args: tuple[str, ...], limit: float | None = None
) -> dict[str, Any]:
    """Run ``script`` within ``limit`` seconds (the part's time); the results of its JSON file
    (empty on failure)."""
    out = run.work / f"{part.name}-{Path(script).stem}.json"
    cmd = [sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)]
    part.commands.append(run.shown(cmd))
    returncode, stopped, output = run_child(cmd, limit or run.limit(part.name))
    if stopped or returncode != 0 or not out.exists():
        part.status = "stopped" if stopped else "fail"
        part.problems.append(
            "stopped at its time limit" if stopped else f"exit {returncode}: {_last_line(output)}"
        )
        return {}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


#: op_count.py's names of the layers that the stem and the models' first layers are.
STEM = "ResNet-50 stem (3→64, 7×7/2)"
FIRST_LAYERS = {
    "torchvision:resnet50": STEM,
    "torchvision:vit_b_16": "ViT-B/16 patch embedding (3→768, 16×16/16)",
}


def _counted(counts: list[dict[str, Any]], layer: str, policy: str) -> str:
    """One call's counted operations, traffic and extra peak memory, as a table's cells."""
    row = next((r for r in counts if r["layer"] == layer and r["policy"].startswith(policy)), None)
    if row is None:
        return "– | – | –"
    peak = f"{row['extra_peak_bytes'] / 2**20:,.0f} MiB ({100 * row['extra_peak_fraction']:.2f}%)"
    return f"{row['ops']:,} | {row['passes']:.1f} | {peak}"


def part_cost(run: Run, part: Part) -> None:
    deadline = time.monotonic() + run.limit("cost")
    op_args = (*run.sizes.op_count, *(() if run.dry_run else ("--device", str(run.device))))
    counted = _benchmark(run, part, "op_count.py", op_args, max(deadline - time.monotonic(), 1))
    counts: list[dict[str, Any]] = counted.get("rows", [])
    overhead_args = ("--device", str(run.device), *run.sizes.cost, *OVERHEAD_COMMON)
    result = _benchmark(
        run, part, "overhead.py", overhead_args, max(deadline - time.monotonic(), 1)
    )
    part.data = {"result": result, "counts": counted}
    judged = run.sizes.judge_cost
    figures: list[dict[str, Any]] = []

    def figure(name: str, value: float | None, target: float | None) -> None:
        """A measured figure; ``target`` None: measured only; judged at full size only."""
        if target is None:
            verdict = "measured"
        elif not judged:
            verdict = "not judged (tiny sizes)"
        else:
            met = value is not None and value <= target
            verdict = "met" if met else "**over**"
            if not met:
                part.status = "fail"
        figures.append({"figure": name, "measured": value, "shown": _fmt(value, ".3f"),
                        "target": target, "result": verdict})  # fmt: skip

    device = str(run.device)
    if "stem" in result:
        stem = result["stem"]
        table = [
            f"ImageNet stem (Conv2d 3→64, 7×7/2, 224²), batch {stem['batch']}: forward + "
            f"backward of the layer, best of {result['repeats']} per round, median of "
            f"{result['rounds']} rounds; beside it the call counted on the meta device "
            "(`benchmarks/op_count.py`: aten operations, traffic in passes over the float32 "
            "patch matrix, extra peak memory)",
            "",
            "| method | statistics_dtype | ms | extra ms | peak MiB | extra MiB | operations "
            "| traffic | counted extra peak |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in stem["rows"]:
            dtype = r["statistics_dtype"] if r["method"] == "trainact" else "–"
            cells = _counted(counts, STEM, f"{device} {dtype} (") if dtype != "–" else "– | – | –"
            table.append(
                f"| {r['method']} | {dtype} | {r['ms']:.2f} | {r['extra_ms']:.2f} | "
                f"{_fmt(r['peak_mib'], '.1f')} | {_fmt(r['extra_mib'], '.1f')} | {cells} |"
            )
        part.markdown.append("\n".join(table))
        for r in stem["rows"]:
            if "time_ratio" in r:
                policy = r["statistics_dtype"] == "default"
                figure(
                    f"stem extra time / torch_tract's ({r['statistics_dtype']})",
                    r["time_ratio"],
                    GPU_TARGETS["stem"] if policy else None,
                )
                if r["memory_ratio"] is not None:
                    figure(
                        f"stem extra peak memory / torch_tract's ({r['statistics_dtype']})",
                        r["memory_ratio"],
                        result["targets"]["stem_memory"] if policy else None,
                    )
    for step in result.get("step", []):
        how = f"{step['model']}, batch {step['batch']}, amp {step['amp']}" + (
            ", channels_last" if step["channels_last"] else ""
        )
        layer = FIRST_LAYERS.get(step["model"], "")
        table = [
            f"{how}: a training step with and without TrAct, alternating (median of the "
            "repeats); beside it TrAct's first layer counted as above",
            "",
            "| statistics_dtype | plain ms | TrAct ms | ratio | operations | traffic | "
            "counted extra peak |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in step["rows"]:
            dtype = r["statistics_dtype"]
            plain = statistics.median(ms["plain"] for ms in r["runs"])
            tract = statistics.median(ms["trainact"] for ms in r["runs"])
            cells = _counted(counts, layer, f"{device} {dtype} (")
            table.append(f"| {dtype} | {plain:.1f} | {tract:.1f} | {r['ratio']:.3f} | {cells} |")
            target = GPU_TARGETS.get(step["model"]) if dtype == "default" else None
            figure(f"step time TrAct / plain: {how} ({dtype})", r["ratio"], target)
        part.markdown.append("\n".join(table))
    if counts:
        table = [
            f"Counted on the meta device at batch {counted['batch']} "
            "(`benchmarks/op_count.py`), every policy",
            "",
            "| layer | policy | product | operations | traffic | extra peak |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in counts:
            table.append(
                f"| {r['layer']} | {r['policy']} | {r['product']} | {r['ops']:,} | "
                f"{r['passes']:.1f} | {100 * r['extra_peak_fraction']:.2f}% |"
            )
        part.markdown.append("\n".join(table))
    rows = ["| figure | measured | target | result |", "|---|---:|---:|---|"]
    for f in figures:
        target = "–" if f["target"] is None else f"≤ {f['target']:g}"
        rows.append(f"| {f['figure']} | {f['shown']} | {target} | {f['result']} |")
    part.markdown.insert(0, "\n".join(rows))
    part.data["figures"] = figures
    over = sum("over" in f["result"] for f in figures)
    part.summary = f"{len(figures)} figures, {over} over target" + (
        "" if judged else " (tiny sizes: cost targets not judged)"
    )


# ---- part 2: accuracy -------------------------------------------------------------------


def part_accuracy(run: Run, part: Part) -> None:
    result = _benchmark(
        run, part, "accuracy.py", ("--device", str(run.device), *run.sizes.accuracy)
    )
    part.data = {"result": result}
    tables = result.get("tables", [])
    for t in tables:
        columns = [c for c in t["rows"][0] if c != "case"] if t["rows"] else []
        lines = [
            f"{'TF32 allowed' if t['tf32'] else 'strict float32'}; policy: "
            + (result["policy"] if t["policy"] == "device" else t["policy"]),
            "",
            "| case | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for row in t["rows"]:
            cells = [
                f"{_fmt(row[c]['error'])} (≤ {row[c]['target']:g})"
                + ("" if row[c]["ok"] else " **over**")
                for c in columns
            ]
            lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
        part.markdown.append("\n".join(lines))
    over = result.get("over", 0)
    if over:
        part.status = "fail"
        part.problems.append(f"{over} cells over their target")
    cells = sum(len(t["rows"]) * 3 for t in tables)
    part.summary = f"{cells - over} of {cells} cells within target"


# ---- parts 3 and 4: the device tests, then the long ones --------------------------------------


def read_junit(path: Path) -> list[dict[str, Any]]:
    """Every test case of a JUnit report: id, file, status, seconds and message."""
    cases = []
    for case in ET.parse(path).iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = child.get("message") or (child.text or "")
        file = case.get("classname", "").replace(".", "/") + ".py"
        cases.append(
            {
                "id": f"{file}::{case.get('name')}",
                "file": file,
                "status": status,
                "seconds": float(case.get("time") or 0),
                "message": " ".join(message.split())[:400],
            }
        )
    return cases


def part_tests(run: Run, part: Part) -> None:
    """pytest on this part's tests (``Sizes.tests`` or ``Sizes.compile``), its JUnit report
    read into a table."""
    junit = run.work / f"{part.name}_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "--device", str(run.device), "-q", "-rfE"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={junit}", *getattr(run.sizes, part.name)]
    part.commands.append(run.shown(cmd))
    returncode, stopped, output = run_child(cmd, run.limit(part.name), interrupt=True)
    run.keep.append((junit, f"gpu_{part.name}_junit.xml"))
    if not junit.exists():
        part.status = "stopped" if stopped else "fail"
        part.problems.append(f"no JUnit report (pytest exit {returncode}): {_last_line(output)}")
        return
    cases = read_junit(junit)
    counts = Counter(c["status"] for c in cases)
    ran = [c for c in cases if c["status"] != "skipped"]
    failed = [c for c in cases if c["status"] in ("failed", "error")]
    part.data = {"returncode": returncode, "stopped": stopped, "counts": dict(counts)}
    part.data["cases"] = cases
    part.summary = (
        f"{counts['passed']} passed, {len(failed)} failed, {counts['skipped']} skipped "
        f"in {sum(c['seconds'] for c in cases):.0f} s"
    )
    if stopped:  # pytest exits 2 when interrupted
        part.status = "stopped"
        part.problems.append(f"stopped at its time limit after {len(cases)} tests")
    elif returncode != 0:
        part.status = "fail"
        part.problems.append(f"pytest exit {returncode}")
    if failed:
        part.status = "fail"
    if not ran:
        part.status = "fail"
        part.problems.append("no test ran on the device")
    by_file: dict[str, Counter[str]] = {}
    seconds: Counter[str] = Counter()
    for c in cases:
        by_file.setdefault(c["file"], Counter())[c["status"]] += 1
        seconds[c["file"]] += c["seconds"]
    lines = ["| tests | passed | failed | skipped | seconds |", "|---|---:|---:|---:|---:|"]
    for file, n in by_file.items():
        bad = n["failed"] + n["error"]
        lines.append(f"| {file} | {n['passed']} | {bad} | {n['skipped']} | {seconds[file]:.1f} |")
    part.markdown.append("\n".join(lines))
    if failed:
        rows = ["| failed test | message |", "|---|---|"]
        rows += [f"| {c['id']} | {_cell(c['message'])} |" for c in failed]
        part.markdown.append("\n".join(rows))
    reasons = Counter(c["message"] for c in cases if c["status"] == "skipped")
    if reasons:
        rows = ["| skipped | reason |", "|---:|---|"]
        rows += [f"| {n} | {_cell(reason)} |" for reason, n in reasons.most_common()]
        part.markdown.append("\n".join(rows))
    slowest = sorted(ran, key=lambda c: -c["seconds"])[:5]
    if slowest:
        part.markdown.append(
            "Slowest: " + "; ".join(f"{c['id']} {c['seconds']:.1f} s" for c in slowest)
        )


# ---- part 5: trainact compare -------------------------------------------------------------


def start_decoding(dataset: str) -> tuple[subprocess.Popen[str], IO[str]]:
    """Decode and cache part 5's dataset in a background CPU process while parts 1-4 run
    (decoding CIFAR-10's 60,000 JPEGs takes 15 s or more on one core)."""
    code = "import sys; from trainact.experiments import data; data.load_dataset(sys.argv[1])"
    errors = tempfile.TemporaryFile("w+")  # read only at the end: a pipe could fill and block
    child = subprocess.Popen(
        [sys.executable, "-c", code, dataset],
        env=child_env(),
        stdout=errors,
        stderr=errors,
        text=True,
    )
    return child, errors


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def part_compare(run: Run, part: Part) -> None:
    deadline = time.monotonic() + run.limit("compare")
    if run.decoding is not None:  # the cache must be complete before the runs read it
        child, errors = run.decoding
        try:
            child.wait(timeout=max(deadline - time.monotonic() - 30, 1))
        except subprocess.TimeoutExpired:
            child.kill()
            part.status = "stopped"
            part.problems.append("decoding the dataset did not finish in time")
            return
        if child.returncode != 0:
            errors.seek(0)
            part.status = "fail"
            part.problems.append(f"decoding the dataset failed: {_last_line(errors.read())}")
            return
    common = ["--preset", "resnet18-cifar10-sgd", "--dataset", run.dataset, "--no-progress"]
    common += ["--device", str(run.device), *run.sizes.compare_args]
    probe_dir = run.work / "probe"
    cmd = [sys.executable, "-m", "trainact", "train", *common, "--method", "tract"]
    cmd += ["--epochs", "1", "--out", str(probe_dir)]
    part.commands.append(run.shown(cmd))
    started = time.monotonic()
    returncode, stopped, output = run_child(cmd, max(deadline - time.monotonic() - 5, 1))
    records = _records(probe_dir / "results.jsonl")
    if returncode != 0 or not records:
        part.status = "stopped" if stopped else "fail"
        part.problems.append(f"the timing run failed: {_last_line(output)}")
        return
    epoch_s = records[0]["seconds"]
    setup_s = time.monotonic() - started - epoch_s  # process start, cached data, model
    budget = min(COMPARE_SECONDS, deadline - time.monotonic() - setup_s - 10)
    epochs = min(run.sizes.compare_max_epochs, math.floor(budget / (2 * 1.1 * epoch_s)))
    part.data = {"epoch_seconds": epoch_s, "setup_seconds": setup_s, "epochs": epochs}
    if epochs < 1:
        part.status = "stopped"
        part.problems.append(f"one epoch takes {epoch_s:.1f} s; {budget:.0f} s were left")
        return
    out = run.work / "compare"
    cmd = [sys.executable, "-m", "trainact", "compare", *common, "--epochs", str(epochs)]
    cmd += ["--seeds", "0", "--out", str(out)]
    part.commands.append(run.shown(cmd))
    returncode, stopped, output = run_child(cmd, max(deadline - time.monotonic() - 2, 1))
    records = _records(out / "results.jsonl")
    run.keep += [(out / "results.jsonl", "compare_results.jsonl")]
    run.keep += [(out / "accuracy.png", "compare_accuracy.png")]
    done = {m: sum(r["method"] == m for r in records) for m in ("baseline", "tract")}
    if stopped or returncode != 0 or any(n != epochs for n in done.values()):
        part.status = "stopped" if stopped else "fail"
        part.problems.append(
            "stopped at its time limit" if stopped else f"exit {returncode}: {_last_line(output)}"
        )
    final = {
        m: max((r for r in records if r["method"] == m), key=lambda r: r["epoch"])["test_acc"]
        for m in done
        if done[m]
    }
    part.data.update(records=records, final_test_acc=final)
    part.summary = f"{epochs} epoch{'s' * (epochs != 1)} (one {epoch_s:.1f} s)" + "".join(
        f"; {m} final test acc {100 * a:.2f} %" for m, a in final.items()
    )
    lines = [
        f"Timing run: one TrAct epoch {epoch_s:.1f} s (plus {setup_s:.1f} s of process start, "
        f"cached data and model); budget chosen: {epochs} epochs per method.",
        "",
        "| epoch | baseline test acc | TrAct test acc | baseline s | TrAct s |",
        "|---:|---:|---:|---:|---:|",
    ]
    by = {(r["method"], r["epoch"]): r for r in records}
    for e in range(1, epochs + 1):
        cells = []
        for key in ("test_acc", "seconds"):
            for m in ("baseline", "tract"):
                r = by.get((m, e))
                if r is None:
                    cells.append("–")
                else:
                    cells.append(f"{100 * r[key]:.2f} %" if key == "test_acc" else f"{r[key]:.1f}")
        lines.append(f"| {e} | {' | '.join(cells)} |")
    part.markdown.append("\n".join(lines))


# ---- the report ---------------------------------------------------------------------------

HOW = {
    "cost": "`benchmarks/op_count.py` counts one training call of the ImageNet stem and the "
    "ViT-B/16 patch embedding on the meta device under this device's policy (each "
    "`statistics_dtype`) and under the H100's and RTX 4090's; `benchmarks/overhead.py` in this "
    "process (`--in-process`) times the stem's forward + backward between device "
    "synchronizations (best of the repeats, median over rounds; CUDA's peak allocation per "
    "measurement) and training steps (forward, cross-entropy, backward, SGD with momentum) of "
    "each model with and without TrAct, alternating, medians. The rows per `statistics_dtype` "
    "put the paths side by side (default: the device's policy; float32: the split product; "
    "float64); targets are judged for the default.",
    "accuracy": "`benchmarks/accuracy.py`: relative Frobenius error of a float32 layer's TrAct "
    "weight gradient on real photos of the embedded CIFAR-10 subset (λ = 0.1) against the "
    "float64 reference, per `statistics_dtype` (default: the device's policy; float32: the "
    "split path; float64), strict float32 and with TF32 allowed "
    "(`torch.set_float32_matmul_precision('high')`, cuDNN TF32 on); cuDNN deterministic.",
    "tests": "The correctness tests of the suite on this device (`pytest --device`; see "
    "tests/conftest.py): every test that takes the `device` fixture runs here, the CPU-only "
    "tests skip with their reason. Each compares TrAct's weight gradient with "
    "G·(XᵀX/n + λI)⁻¹ computed in float64 from explicitly extracted patches "
    "(`trainact.testing`), G being a plain copy's gradient on the same input under the same "
    "settings; CUDA runs with strict float32 and deterministic cuDNN unless a test allows TF32.",
    "compile": "The same, for the tests that compile or train whole models: `torch.compile` "
    "(one graph for every batch size, reduce-overhead), autocast, GradScaler, checkpointing, "
    "no host synchronization added, and the timm, torchvision and Hugging Face zoos.",
    "compare": "The dataset is decoded and cached by a background CPU process while parts 1-4 "
    "run. `trainact train --method tract --epochs 1` first times one epoch; then `trainact "
    "compare` runs at the largest epoch budget whose two runs fit the time left (at most "
    f"{COMPARE_SECONDS} s of epochs), one seed. Accuracy is on the full test split.",
}


def _policy(device: torch.device) -> str:
    try:
        return precision_for(device, None, torch.float32).describe()
    except (RuntimeError, AssertionError) as err:  # no such device: the pre-flight says why
        return f"unknown ({type(err).__name__})"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(run: Run) -> dict[str, str]:
    if run.device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(run.device)
        device = (
            f"{props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB"
        )
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    packages = ("numpy", "pytest", "hypothesis", "transformers", "timm", "torchvision")
    return {
        "device": device,
        "precision policy": _policy(run.device),
        "run": "dry run (tiny sizes)" if run.dry_run else "full check",
        "torch": torch.__version__,
        "CUDA": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()) if run.device.type == "cuda" else "–",
        "python": platform.python_version(),
        "trainact": f"{trainact.__version__} ({commit or 'commit unknown'})",
        "packages": ", ".join(f"{p} {_version(p)}" for p in (*packages, "torch_tract")),
    }


def render(
    run: Run,
    env: dict[str, str],
    preflight: list[str],
    parts: list[Part],
    seconds: float,
    command: str,
) -> str:
    by_name = {p.name: p for p in parts}
    checked = "passed" if not preflight else "**failed**: " + "; ".join(preflight)
    lines = [
        "# TrAct GPU check",
        "",
        f"    {command}",
        "",
        *(f"- **{k}**: {v}" for k, v in env.items()),
        f"- **pre-flight**: {checked}",
        f"- **date**: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time "
        f"{seconds:.0f} s (budget {run.budget:.0f} s)",
        "- **result**: "
        + "; ".join(
            f"{p.name} {p.status.upper()}" + (f" ({p.summary})" if p.summary else "") for p in parts
        ),  # fmt: skip
        "",
    ]
    for number, (name, title) in enumerate(PARTS.items(), 1):
        lines += [f"## {number}. {title}", ""]
        part = by_name.get(name)
        if part is None:
            reason = "the pre-flight failed" if preflight else "`--parts`, or not reached yet"
            lines += [f"Not run ({reason}).", ""]
            continue
        lines += [HOW[name], ""]
        lines += [f"    {c}" for c in part.commands] + [""]
        lines += [f"**{part.status}** in {part.seconds:.0f} s" + (
            f": {part.summary}" if part.summary else ""), ""]  # fmt: skip
        lines += [f"- {p}" for p in part.problems] + ([""] if part.problems else [])
        for block in part.markdown:
            lines += [block, ""]
    return "\n".join(lines)


def _parts(values: list[str]) -> list[str]:
    names = list(PARTS)
    chosen = [names[int(v) - 1] if v.isdigit() and 0 < int(v) <= len(names) else v for v in values]
    unknown = [v for v in chosen if v not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}: choose from {names} or 1-5")
    return [n for n in names if n in chosen]


def check_before_starting(run: Run) -> list[str]:
    """The pre-flight, in seconds and before any GPU work: what would make a part fail for a
    reason known now (a missing file, package or script, no CUDA)."""
    problems = []
    if run.dataset != "cifar10-subset" and not Path(run.dataset).is_file():
        problems.append(
            f"--dataset {run.dataset}: no such file (`bash benchmarks/gpu_run.sh prepare` puts "
            "the CIFAR-10 archive in .gpu/)"
        )
    missing = [m for m in run.sizes.needs if importlib.util.find_spec(m) is None]
    if missing:
        problems.append(f"missing packages: {', '.join(missing)}")
    for script in ("overhead.py", "op_count.py", "accuracy.py"):
        if not (BENCHMARKS / script).is_file():
            problems.append(f"benchmarks/{script} is missing")
    if not run.dry_run and not torch.cuda.is_available():
        problems.append(
            f"CUDA is not available (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    return problems


def publish(
    run: Run, out: Path, preflight: list[str], parts: list[Part], start: float, command: str
) -> None:
    """Write the report and its JSON twin (and copy them, with the kept files, to ``$OUT``):
    after the pre-flight and after every part, so that a run cut off keeps what it measured."""
    env = environment(run)
    seconds = time.monotonic() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(run, env, preflight, parts, seconds, command))
    data = {
        "environment": env,
        "dry_run": run.dry_run,
        "budget": run.budget,
        "seconds": seconds,
        "preflight": preflight,
        "parts": [asdict(p) for p in parts],
    }
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out_dir = os.environ.get("OUT")
    if out_dir:
        for path in (out, out.with_suffix(".json")):
            shutil.copy(path, Path(out_dir) / path.name)
        for src, name in run.keep:
            if src.exists():
                shutil.copy(src, Path(out_dir) / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report.md"), help="Markdown report")
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny sizes")
    parser.add_argument(
        "--dataset",
        help="part 5's CIFAR-10 (.gpu/cifar10-jpeg.tar.gz); default the embedded subset",
    )
    parser.add_argument("--budget", type=float, default=360, help="seconds for the whole run")
    parser.add_argument("--device", help="cuda (default where available), cuda:1, cpu, ...")
    parser.add_argument(
        "--parts", nargs="+", default=list(PARTS), help=f"a subset of {', '.join(PARTS)} (or 1-5)"
    )
    args = parser.parse_args(argv)
    try:
        chosen = _parts(args.parts)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dry = args.dry_run or device.type != "cuda"
    start = time.monotonic()
    command = " ".join(
        ["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"gpu_check: {'dry run' if dry else 'full check'} on {device}: {chosen}", flush=True)
    parts: list[Part] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        run = Run(
            device,
            DRY if dry else GPU,
            dry,
            start + args.budget,
            Path(tmp),
            args.dataset or "cifar10-subset",
            chosen,
            args.budget,
        )
        preflight = check_before_starting(run)
        print(f"== pre-flight: {preflight or 'passed'}", flush=True)
        publish(run, args.out, preflight, parts, start, command)
        if preflight:
            return 2
        if "compare" in chosen:
            run.decoding = start_decoding(run.dataset)
        functions = {
            "cost": part_cost,
            "accuracy": part_accuracy,
            "tests": part_tests,
            "compile": part_tests,
            "compare": part_compare,
        }
        for name in chosen:
            part = Part(name)
            began = time.monotonic()
            print(f"\n== {name} ({run.limit(name):.0f} s)", flush=True)
            try:
                functions[name](run, part)
            except Exception as err:  # a part that breaks is a finding, never the end
                part.status = "fail"
                part.problems.append(f"{type(err).__name__}: {err}")
            part.seconds = time.monotonic() - began
            print(f"== {name}: {part.status} {part.summary} {part.problems}", flush=True)
            parts.append(part)
            publish(run, args.out, preflight, parts, start, command)
        if run.decoding is not None and run.decoding[0].poll() is None:
            run.decoding[0].kill()  # part 5 never waited for it
    failed = [p for p in parts if p.status == "fail"]
    print(f"\nwrote {args.out}: " + ", ".join(f"{p.name} {p.status}" for p in parts))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
