"""What TrAct costs: time and peak memory ratios against the plain layer and ``torch_tract``.

    python benchmarks/overhead.py                 # the three benchmarks on the CPU
    python benchmarks/overhead.py --device cuda   # on a GPU
    python benchmarks/overhead.py --only stem --statistics-dtype float32   # another path

1. ImageNet stem (Conv2d 3→64, 7×7, stride 2, padding 3, 224², batch 32), forward + backward of
   the layer alone: TrAct's extra time and extra peak memory over the plain layer, as a fraction
   of ``torch_tract``'s (targets: ≤ 0.5 for time, ≤ 0.25 for memory).
2. A whole training step (forward, backward, SGD step) of a small CIFAR ResNet at batch 128:
   time with TrAct on its stem over time without (target: ≤ 1.03). The two models' steps
   alternate within each process, and the median ratio over ``--rounds`` processes is reported.
3. An MLP on flattened images whose first layer is wider than its batch (n < d: the n×n form):
   ``Linear(3072)`` (CIFAR) and ``Linear(784)`` (MNIST) first layers, hidden width 512, batch
   128: step time with TrAct over without (target: ≤ 1.3) and the first layer's gradient
   against the float64 answer (target: ≤ 1e-5).

Each stem measurement runs in its own process, so that peak memory (CUDA's peak allocation, or
the process's peak resident set on the CPU) belongs to one method; the methods are interleaved
over several rounds and the median is reported, which keeps a busy machine from favouring one.
On the CPU, memory is measured in separate processes with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_), so that freed blocks go back to the system and the peak resident set
is the peak of live memory rather than of glibc's cached heap; times come from the default
allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import trainact

STEM_METHODS = ("plain", "trainact", "torch_tract")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _options(statistics_dtype: str) -> dict:
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    return {"statistics_dtype": dtypes[statistics_dtype]} if statistics_dtype in dtypes else {}


def stem_worker(
    method: str, batch: int, repeats: int, device: str, statistics_dtype: str = "default"
) -> dict[str, float]:
    """Time (best of ``repeats``) and peak memory of one method's stem forward + backward."""
    if device == "cuda":  # the peak of this call alone, also when run in-process
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
    batch: int, repeats: int, device: str, model_name: str, statistics_dtype: str = "default"
) -> dict[str, float]:
    """Median step time of a CIFAR ResNet (or an MLP: ``mlp-3072``, ``mlp-784``) with and
    without TrAct, the two models' steps alternating in one process so that a machine's drift
    hits both alike."""
    x, model_fn = _model_and_batch(model_name, batch, device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for method in ("plain", "trainact"):
        torch.manual_seed(0)
        model = model_fn().to(device)
        if method == "trainact":
            trainact.apply(model, **_options(statistics_dtype))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            nn.functional.cross_entropy(model(x), y).backward()
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


def _model_and_batch(name: str, batch: int, device: str) -> tuple[torch.Tensor, Callable]:
    if name.startswith("mlp-"):
        d = int(name.removeprefix("mlp-"))
        return torch.randn(batch, d, device=device), lambda: mlp(d)
    from trainact.experiments.models import build_model

    x = torch.randn(batch, 3, 32, 32, device=device)
    return x, lambda: build_model(name, num_classes=10)


def mlp_error(d: int, batch: int, device: str, statistics_dtype: str = "default") -> float:
    """The MLP's first layer (``Linear(d, 512)``): its TrAct gradient against the float64 answer
    for the same input."""
    from trainact.testing import tract_error

    torch.manual_seed(0)
    x = torch.randn(batch, d, device=device)
    dtype = _options(statistics_dtype).get("statistics_dtype")
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


def _run_worker(args: argparse.Namespace, bench: str, method: str = "", model: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", bench, "--method", method]
    cmd += ["--device", args.device, "--batch", str(args.batch), "--repeats", str(args.repeats)]
    cmd += ["--step-batch", str(args.step_batch), "--model", model or args.model]
    cmd += ["--statistics-dtype", args.statistics_dtype]

    def run(env: dict[str, str]) -> dict:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    result = run(dict(os.environ))
    if args.device == "cpu" and bench == "stem":
        result["peak_mib"] = run({**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})["peak_mib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32, help="stem batch size")
    parser.add_argument("--step-batch", type=int, default=128, help="ResNet step batch size")
    parser.add_argument("--model", default="resnet18", help="the CIFAR ResNet of benchmark 2")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per process")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved processes per method")
    parser.add_argument("--only", choices=["stem", "step", "mlp"], help="run one benchmark")
    parser.add_argument(
        "--statistics-dtype",
        choices=["default", "float32", "float64"],
        default="default",
        help="TrAct's statistics_dtype (default: the device's precision policy)",
    )
    parser.add_argument("--worker", choices=["stem", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.statistics_dtype
    if args.worker == "stem":
        print(json.dumps(stem_worker(args.method, args.batch, args.repeats, args.device, dtype)))
        return
    if args.worker == "step":
        step = step_worker(args.step_batch, args.repeats, args.device, args.model, dtype)
        print(json.dumps(step))
        return

    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"statistics_dtype {dtype}"
    )
    if args.only in (None, "stem"):
        runs = {m: [] for m in STEM_METHODS}
        for _ in range(args.rounds):
            for m in STEM_METHODS:
                runs[m].append(_run_worker(args, "stem", m))
        ms = {m: statistics.median(r["ms"] for r in runs[m]) for m in STEM_METHODS}
        mib = {m: statistics.median(r["peak_mib"] for r in runs[m]) for m in STEM_METHODS}
        extra_ms = {m: ms[m] - ms["plain"] for m in STEM_METHODS}
        extra_mib = {m: mib[m] - mib["plain"] for m in STEM_METHODS}
        print(f"\nImageNet stem, batch {args.batch}, forward+backward of the layer")
        print(f"{'method':<12}{'ms':>10}{'extra ms':>10}{'peak MiB':>10}{'extra MiB':>11}")
        for m in STEM_METHODS:
            print(f"{m:<12}{ms[m]:>10.1f}{extra_ms[m]:>10.1f}{mib[m]:>10.1f}{extra_mib[m]:>11.1f}")
        time_ratio = extra_ms["trainact"] / extra_ms["torch_tract"]
        print(f"extra time  trainact/torch_tract = {time_ratio:.3f} (target <= 0.5)")
        print(
            f"extra peak  trainact/torch_tract = "
            f"{extra_mib['trainact'] / extra_mib['torch_tract']:.3f} (target <= 0.25)"
        )
    if args.only in (None, "step"):
        ratios = []
        for _ in range(args.rounds):
            ms = _run_worker(args, "step")
            plain, tract = ms["plain"], ms["trainact"]
            ratios.append(tract / plain)
            print(f"  {args.model} step: plain {plain:.1f} ms, trainact {tract:.1f} ms")
        print(
            f"\n{args.model} training step, batch {args.step_batch}: time with TrAct / without = "
            f"{statistics.median(ratios):.3f} (median of {args.rounds} processes; target <= 1.03)"
        )
    if args.only in (None, "mlp"):
        print(f"\nMLP (hidden 512) training step, batch {args.step_batch}: n < d, the n×n form")
        for d in (3072, 784):
            ratios = []
            for _ in range(args.rounds):
                ms = _run_worker(args, "step", model=f"mlp-{d}")
                ratios.append(ms["trainact"] / ms["plain"])
                plain, tract = ms["plain"], ms["trainact"]
                print(f"  Linear({d}) first: plain {plain:.2f} ms, trainact {tract:.2f} ms")
            error = mlp_error(d, args.step_batch, args.device, dtype)
            print(
                f"Linear({d}) first layer: time with TrAct / without = "
                f"{statistics.median(ratios):.3f} (median of {args.rounds}; target <= 1.3); "
                f"error against float64 {error:.1e} (target <= 1e-5)"
            )


if __name__ == "__main__":
    main()
