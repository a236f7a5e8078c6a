"""How sharp the main job's verdict is for its epochs, seeds and test images.

Reads the runs of ``trainact sweep`` directories (ResNet-tiny on the embedded subset, budgets
and seeds as run there), evaluates each run's final checkpoint on 500, 1,000 and 2,000 test
images of the embedded subset (the first ones: the subset stores its test split in a random
order) and, given the CIFAR-10 archive, on its 10,000 test images, and prints per budget and test
size the paired TrAct - baseline difference over seeds, its standard deviation, and the
half-width of the 95% interval that 5 seeds with that deviation give; ``--time-eval`` prints
instead how long one evaluation of ResNet-tiny takes (one thread, best of 3) by test size and
evaluation batch::

    trainact sweep --budgets 2 3 4 --seeds 0 1 2 3 4 5 6 7 --threads 1 --out runs/study
    python docs/results/main_job_study.py runs/study --cifar10 path/to/cifar10-jpeg.tar.gz
    python docs/results/main_job_study.py --time-eval --cifar10 path/to/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from trainact.experiments import train
from trainact.experiments.data import load_dataset
from trainact.experiments.evidence import t_quantile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", type=Path, nargs="*", help="trainact sweep directories")
    parser.add_argument("--time-eval", action="store_true", help="time the evaluation instead")
    parser.add_argument("--cifar10", help="the CIFAR-10 archive, for its 10,000 test images")
    parser.add_argument("--seeds", type=int, default=5, help="the seeds of the half-width")
    args = parser.parse_args()
    torch.set_num_threads(1)

    subset = load_dataset("cifar10-subset", progress=False)
    tests = {n: (subset.test_images[:n], subset.test_labels[:n]) for n in (500, 1000, 2000)}
    if args.cifar10:
        full = load_dataset(args.cifar10, progress=False)
        tests[len(full.test_labels)] = (full.test_images, full.test_labels)
    mean = torch.tensor(subset.mean).view(1, 3, 1, 1)
    std = torch.tensor(subset.std).view(1, 3, 1, 1)
    if args.time_eval:
        _time_eval(tests, mean, std)
        return

    acc: dict[tuple[int, int, int, str], float] = {}  # (budget, test size, seed, method)
    for sweep in args.sweeps:
        for line in (sweep / "sweep.jsonl").read_text().splitlines():
            r = json.loads(line)
            run = sweep / f"{r['method']}-e{r['epochs']}-seed{r['seed']}"
            cfg = train.Config(**{**_config(run), "method": r["method"]})
            model = train.build_model(cfg.model, 10)
            state = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
            model.load_state_dict(state)
            for n, (x, y) in tests.items():
                _, top1, _ = train.evaluate(
                    model, x, y, cfg, mean, std, lambda: torch.autocast("cpu", enabled=False), 10
                )
                acc[r["epochs"], n, r["seed"], r["method"]] = top1

    k = args.seeds
    print(f"budget  test images  seeds  mean d  sd(d)  half-width for {k} seeds  (points)")
    for budget in sorted({key[0] for key in acc}):
        for n in tests:
            seeds = sorted({key[2] for key in acc if key[:2] == (budget, n)})
            d = [100 * (acc[budget, n, s, "tract"] - acc[budget, n, s, "baseline"]) for s in seeds]
            sd = statistics.stdev(d)
            half = t_quantile(0.975, k - 1) * sd / math.sqrt(k)
            print(
                f"{budget:>6}  {n:>11}  {len(d):>5}  {statistics.mean(d):+6.2f}  {sd:5.2f}  "
                f"{half:5.2f}"
            )


def _time_eval(tests: dict, mean: torch.Tensor, std: torch.Tensor) -> None:
    model = train.build_model("resnet-tiny", 10)
    print("test images  batch  seconds")
    for n, (x, y) in tests.items():
        for batch in (250, 1000):
            cfg = train.Config(eval_batch_size=batch)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                train.evaluate(
                    model, x, y, cfg, mean, std, lambda: torch.autocast("cpu", enabled=False), 10
                )
                times.append(time.perf_counter() - start)
            print(f"{n:>11}  {batch:>5}  {min(times):7.3f}")


def _config(run: Path) -> dict:
    return json.loads((run / "job.json").read_text())["config"]


if __name__ == "__main__":
    main()
