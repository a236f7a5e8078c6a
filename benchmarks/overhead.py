"""What TrAct costs: time and peak memory ratios against the plain layer and ``torch_tract``.

    python benchmarks/overhead.py                 # the three benchmarks on the CPU
    python benchmarks/overhead.py --device cuda   # on a GPU
    python benchmarks/overhead.py --only stem --statistics-dtype float32 float64   # both paths

1. ImageNet stem (Conv2d 3→64, 7×7, stride 2, padding 3, 224², batch 32), forward + backward of
   the layer alone: TrAct's extra time and extra peak memory over the plain layer, as a fraction
   of ``torch_tract``'s (targets: ≤ 0.5 for time, ≤ 0.25 for memory).
2. A whole training step (forward, backward, SGD step) of a small CIFAR ResNet at batch 128:
   time with TrAct on its stem over time without (target: ≤ 1.03). The two models' steps
   alternate within each process, and the median ratio over ``--rounds`` processes is reported.
   ``--amp bf16`` and ``--channels-last`` time it as GPUs usually train; ``--model`` takes
   several, among them torchvision's ``torchvision:resnet50`` and ``torchvision:vit_b_16`` on
   224² images (TrAct on their ``conv1`` and ``conv_proj``).
3. An MLP on flattened images whose first layer is wider than its batch (n < d: the n×n form):
   ``Linear(3072)`` (CIFAR) and ``Linear(784)`` (MNIST) first layers, hidden width 512, batch
   128 (``--mlp-batch``): step time with TrAct over without (target: ≤ 1.3) and the first
   layer's gradient against the float64 answer (target: ≤ 1e-5).

``--cpu-chunk-mib`` sets TrAct's chunk on the CPU (default 4 MiB), to measure what its size
costs. ``--statistics-dtype`` takes one or more of ``default`` (the device's precision policy),
``float32`` (the split float32 path of devices without fast float64) and ``float64``: each
benchmark runs TrAct once per value, so the paths' costs stand side by side.

Each stem measurement runs in its own process, so that peak memory (CUDA's peak allocation, or
the process's peak resident set on the CPU) belongs to one method; the methods are interleaved
over several rounds and the median is reported, which keeps a busy machine from favouring one.
On the CPU, memory is measured in separate processes with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_), so that freed blocks go back to the system and the peak resident set
is the peak of live memory rather than of glibc's cached heap; times come from the default
allocator. ``--in-process`` runs every measurement in this process instead (no process starts:
what a time-limited GPU run wants); CUDA's peak allocation is then still per measurement, the
CPU's peak resident set is not and is left out. ``--json`` also writes every figure to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import trainact

STEM_METHODS = ("plain", "trainact", "torch_tract")
DTYPES = {"default": None, "float32": torch.float32, "float64": torch.float64}
TARGETS = {"stem_time": 0.5, "stem_memory": 0.25, "step": 1.03, "mlp": 1.3, "mlp_error": 1e-5}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _options(statistics_dtype: str) -> dict[str, Any]:
    return {"statistics_dtype": DTYPES[statistics_dtype]}


def stem_worker(
    method: str, batch: int, repeats: int, device: str, statistics_dtype: str = "default"
) -> dict[str, float]:
    """Time (best of ``repeats``) and peak memory of one method's stem forward + backward."""
    if device.startswith("cuda"):  # the peak of this call alone, also when run in-process
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    if method == "trainact":
        trainact.TrAct(layer, **_options(statistics_dtype))
    elif method == "torch_tract":
        import torch_tract

        layer = torch_tract.TrAct(layer)
    layer = layer.to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    grad = torch.ones(batch, 64, 112, 112, device=device)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        layer.weight.grad = None
        _sync(device)
        start = time.perf_counter()
        layer(x).backward(grad)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * min(times[1:]), "peak_mib": _peak_mib(device)}


def step_worker(
    batch: int,
    repeats: int,
    device: str,
    model_name: str,
    statistics_dtype: str = "default",
    amp: str = "none",
    channels_last: bool = False,
) -> dict[str, float]:
    """Median step time of a CIFAR ResNet (or an MLP: ``mlp-3072``, ``mlp-784``) with and
    without TrAct, the two models' steps alternating in one process so that a machine's drift
    hits both alike."""
    x, model_fn = _model_and_batch(model_name, batch, device)
    memory_format = torch.channels_last if channels_last and x.dim() == 4 else None
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = (
        (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16))
        if amp == "bf16"
        else contextlib.nullcontext
    )
    steps = {}
    for method in ("plain", "trainact"):
        torch.manual_seed(0)
        model = model_fn().to(device)
        if memory_format is not None:
            model = model.to(memory_format=memory_format)
        if method == "trainact":
            layer = TORCHVISION_FIRST_LAYERS.get(model_name.removeprefix("torchvision:"))
            trainact.apply(model, layer=layer, **_options(statistics_dtype))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            with autocast():
                out = model(x)
            nn.functional.cross_entropy(out.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[method] = step
    times = alternate_steps(steps, repeats, device)
    return {m: 1000 * statistics.median(t) for m, t in times.items()}


def mlp(d: int, hidden: int = 512) -> nn.Sequential:
    """An MLP on flattened images: ``Linear(d, hidden)``, ReLU, ``Linear(hidden, hidden)``,
    ReLU, ``Linear(hidden, 10)``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


#: torchvision's models that benchmark 2 takes (``torchvision:<name>``, 224² images), with the
#: layer TrAct goes on.
TORCHVISION_FIRST_LAYERS = {"resnet50": "conv1", "vit_b_16": "conv_proj"}


def _model_and_batch(name: str, batch: int, device: str) -> tuple[torch.Tensor, Callable]:
    if name.startswith("mlp-"):
        d = int(name.removeprefix("mlp-"))
        return torch.randn(batch, d, device=device), lambda: mlp(d)
    if name.startswith("torchvision:"):
        import torchvision

        factory = getattr(torchvision.models, name.removeprefix("torchvision:"))
        return torch.randn(batch, 3, 224, 224, device=device), lambda: factory(num_classes=1000)
    from trainact.experiments.models import build_model

    x = torch.randn(batch, 3, 32, 32, device=device)
    return x, lambda: build_model(name, num_classes=10)


def mlp_error(d: int, batch: int, device: str, statistics_dtype: str = "default") -> float:
    """The MLP's first layer (``Linear(d, 512)``): its TrAct gradient against the float64 answer
    for the same input."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the root `testing`
    from testing.harness import tract_error

    torch.manual_seed(0)
    x = torch.randn(batch, d, device=device)
    dtype = DTYPES[statistics_dtype]
    return tract_error(nn.Linear(d, 512).to(device), x, statistics_dtype=dtype)


def alternate_steps(
    steps: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` timed calls per step function, after ``warmup`` untimed
    ones; the functions take turns (and alternate which goes first), so that a machine's drift
    hits all alike. Each call is timed between device synchronizations."""
    times: dict[str, list[float]] = {m: [] for m in steps}
    for i in range(warmup + repeats):
        for method in sorted(steps, reverse=i % 2 == 1):
            _sync(device)
            start = time.perf_counter()
            steps[method]()
            _sync(device)
            if i >= warmup:
                times[method].append(time.perf_counter() - start)
    return times


def _worker_args(args: argparse.Namespace) -> list[str]:
    chunk = ["--cpu-chunk-mib", str(args.cpu_chunk_mib)] if args.cpu_chunk_mib else []
    return ["--device", args.device, "--batch", str(args.batch), "--repeats", str(args.repeats),
            *chunk]  # fmt: skip


def _run_stem(args: argparse.Namespace, method: str, dtype: str) -> dict[str, float | None]:
    if args.in_process:
        result: dict[str, float | None] = dict(
            stem_worker(method, args.batch, args.repeats, args.device, dtype)
        )
        if not args.device.startswith("cuda"):
            result["peak_mib"] = None  # this process's peak, not the method's
        return result
    cmd = [sys.executable, __file__, "--worker", "stem", "--method", method, *_worker_args(args)]
    cmd += ["--statistics-dtype", dtype]

    def run(env: dict[str, str]) -> dict[str, float]:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    result = dict(run(dict(os.environ)))
    if args.device == "cpu":
        result["peak_mib"] = run({**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})["peak_mib"]
    return result


def _run_step(args: argparse.Namespace, model: str, dtype: str) -> dict[str, float]:
    batch = args.mlp_batch if model.startswith("mlp-") else args.step_batch
    if args.in_process:
        return step_worker(
            batch, args.repeats, args.device, model, dtype, args.amp, args.channels_last
        )
    cmd = [sys.executable, __file__, "--worker", "step", *_worker_args(args)]
    cmd += ["--step-batch", str(batch), "--model", model, "--statistics-dtype", dtype]
    cmd += ["--amp", args.amp] + (["--channels-last"] if args.channels_last else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def bench_stem(args: argparse.Namespace) -> dict[str, Any]:
    """Rows per method (trainact once per statistics dtype), medians over the rounds."""
    try:
        import torch_tract  # noqa: F401

        methods = [("plain", "default"), ("torch_tract", "default")]
    except ImportError:
        methods = [("plain", "default")]
    methods += [("trainact", dtype) for dtype in args.statistics_dtype]
    runs: dict[tuple[str, str], list[dict[str, float | None]]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method, dtype in methods:
            runs[(method, dtype)].append(_run_stem(args, method, dtype))
    rows = []
    for method, dtype in methods:
        ms = statistics.median(r["ms"] for r in runs[(method, dtype)])
        peaks = [r["peak_mib"] for r in runs[(method, dtype)]]
        mib = statistics.median(peaks) if None not in peaks else None
        rows.append({"method": method, "statistics_dtype": dtype, "ms": ms, "peak_mib": mib})
    plain = rows[0]
    reference = next((r for r in rows if r["method"] == "torch_tract"), None)
    for row in rows:
        row["extra_ms"] = row["ms"] - plain["ms"]
        row["extra_mib"] = None if row["peak_mib"] is None else row["peak_mib"] - plain["peak_mib"]
        if row["method"] == "trainact" and reference is not None:
            row["time_ratio"] = _ratio(row["extra_ms"], reference["extra_ms"])
            row["memory_ratio"] = _ratio(row["extra_mib"], reference["extra_mib"])
    print(f"\nImageNet stem, batch {args.batch}, forward+backward of the layer")
    print(f"{'method':<24}{'ms':>10}{'extra ms':>10}{'peak MiB':>10}{'extra MiB':>11}")
    for r in rows:
        label = r["method"] + (f" ({r['statistics_dtype']})" if r["method"] == "trainact" else "")
        print(
            f"{label:<24}{r['ms']:>10.2f}{r['extra_ms']:>10.2f}{_fmt(r['peak_mib']):>10}"
            f"{_fmt(r['extra_mib']):>11}"
        )
    for r in rows:
        if "time_ratio" in r:
            print(
                f"trainact ({r['statistics_dtype']}) / torch_tract: extra time "
                f"{_fmt(r['time_ratio'], '.3f')} (target <= {TARGETS['stem_time']}), extra peak "
                f"{_fmt(r['memory_ratio'], '.3f')} (target <= {TARGETS['stem_memory']})"
            )
    return {"batch": args.batch, "rows": rows}


def bench_step(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per model: the step-time ratio per statistics dtype, medians over the rounds."""
    setting = f"batch {args.step_batch}, amp {args.amp}" + (
        ", channels_last" if args.channels_last else ""
    )
    results = []
    for model in args.model:
        print(f"\n{model} training step, {setting}")
        rows = []
        for dtype in args.statistics_dtype:
            ratios, runs = [], []
            for _ in range(args.rounds):
                ms = _run_step(args, model, dtype)
                runs.append(ms)
                ratios.append(ms["trainact"] / ms["plain"])
                print(f"  ({dtype}) plain {ms['plain']:.2f} ms, trainact {ms['trainact']:.2f} ms")
            ratio = statistics.median(ratios)
            print(
                f"{model} ({dtype}): time with TrAct / without = {ratio:.3f} "
                f"(median of {args.rounds} rounds; target <= {TARGETS['step']})"
            )
            rows.append({"statistics_dtype": dtype, "ratio": ratio, "runs": runs})
        results.append({"model": model, "batch": args.step_batch, "amp": args.amp,
                        "channels_last": args.channels_last, "rows": rows})  # fmt: skip
    return results


def bench_mlp(args: argparse.Namespace) -> dict[str, Any]:
    print(f"\nMLP (hidden 512) training step, batch {args.mlp_batch}: n < d, the n×n form")
    rows = []
    for d in (3072, 784):
        for dtype in args.statistics_dtype:
            ratios, runs = [], []
            for _ in range(args.rounds):
                ms = _run_step(args, f"mlp-{d}", dtype)
                runs.append(ms)
                ratios.append(ms["trainact"] / ms["plain"])
            error = mlp_error(d, args.mlp_batch, args.device, dtype)
            ratio = statistics.median(ratios)
            print(
                f"Linear({d}) first layer ({dtype}): time with TrAct / without = {ratio:.3f} "
                f"(median of {args.rounds}; target <= {TARGETS['mlp']}); error against float64 "
                f"{error:.1e} (target <= {TARGETS['mlp_error']})"
            )
            rows.append({"d": d, "statistics_dtype": dtype, "ratio": ratio, "error": error,
                         "runs": runs})  # fmt: skip
    return {"batch": args.mlp_batch, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32, help="stem batch size")
    parser.add_argument("--step-batch", type=int, default=128, help="ResNet batch size")
    parser.add_argument("--mlp-batch", type=int, help="MLP batch size (default: --step-batch)")
    parser.add_argument(
        "--model",
        nargs="+",
        default=["resnet18"],
        help="benchmark 2's models: CIFAR models of trainact.experiments.models, or "
        f"torchvision:{' torchvision:'.join(TORCHVISION_FIRST_LAYERS)} (224² images)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per process")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved processes per method")
    parser.add_argument("--only", choices=["stem", "step", "mlp"], nargs="+", help="benchmarks")
    parser.add_argument(
        "--statistics-dtype",
        choices=list(DTYPES),
        nargs="+",
        default=["default"],
        help="TrAct's statistics_dtype, one or more (default: the device's precision policy)",
    )
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="step autocast")
    parser.add_argument("--channels-last", action="store_true", help="step in channels_last")
    parser.add_argument("--in-process", action="store_true", help="no worker processes")
    parser.add_argument(
        "--cpu-chunk-mib", type=float, help="TrAct's chunk on the CPU, in MiB (default 4)"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--worker", choices=["stem", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.mlp_batch = args.mlp_batch or args.step_batch
    if args.cpu_chunk_mib:  # what the CPU's chunk size costs: every TrAct call of this process
        from trainact.nn import adapters

        adapters.CHUNK_BYTES = int(args.cpu_chunk_mib * 2**20)
    if args.worker == "stem":
        dtype = args.statistics_dtype[0]
        print(json.dumps(stem_worker(args.method, args.batch, args.repeats, args.device, dtype)))
        return
    if args.worker == "step":
        step = step_worker(
            args.step_batch,
            args.repeats,
            args.device,
            args.model[0],
            args.statistics_dtype[0],
            args.amp,
            args.channels_last,
        )
        print(json.dumps(step))
        return

    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"statistics_dtype {' '.join(args.statistics_dtype)}, "
        f"{'in-process' if args.in_process else 'worker processes'}"
    )
    benchmarks: dict[str, Callable[[argparse.Namespace], Any]]
    benchmarks = {"stem": bench_stem, "step": bench_step, "mlp": bench_mlp}
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for name in args.only or list(benchmarks):
        results[name] = benchmarks[name](args)
    if args.json:
        meta = {
            "benchmark": "overhead",
            "device": args.device,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "repeats": args.repeats,
            "in_process": args.in_process,
            "targets": TARGETS,
            "seconds": time.perf_counter() - start,
        }
        args.json.write_text(json.dumps({**meta, **results}, indent=1))


if __name__ == "__main__":
    main()
