"""The ``trainact`` command: train, compare, sweep, plot.

    trainact compare                       # the main job: baseline vs TrAct, minutes on a CPU
    trainact compare --model vit-tiny --optimizer adam --lr 1e-3 --input-range raw
    trainact train --method tract --model resnet-narrow --epochs 10
    trainact train --out runs/t --resume   # continue an interrupted run
    trainact compare --preset resnet18-cifar10-sgd --epochs 100 --device cuda
    trainact sweep --preset resnet18-cifar10-sgd --device cuda --out runs/fig3
    trainact sweep --budgets 1 2 4 --dataset path/to/images.tar.gz   # train/<class>/*, test/...
    trainact sweep --budgets 1 --lams 0.01 0.1 1 10    # λ: the baseline once per budget and seed
    trainact compare --optimizer adam --lr 1e-3 --first-layer-optimizer sgd --first-layer-lr 0.08
    trainact plot runs/compare-... --x time        # accuracy against wall-clock seconds

Precedence: built-in defaults < --preset < explicit options. An option that would be ignored
(``compare --seed``, ``sweep --epochs``, ``--gamma`` without a step schedule, ...) is refused,
naming the option to use instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainact.experiments.config import Config

MISSING_EXTRAS = (
    "the trainact command needs the experiments extra: pip install 'trainact[experiments]' "
    "(numpy, pillow, tqdm, matplotlib; filelock comes with torch)"
)
# The seeds of compare and sweep without --seeds: the paper's 5 (see docs/experiments.md).
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help)


def _add_config_args(p: argparse.ArgumentParser, *, method: bool) -> None:
    """Every Config knob, default None so that presets and defaults fill the rest."""
    from trainact.experiments.config import CHOICES, DATASET_NAMES, MODEL_NAMES, OPTIMIZERS
    from trainact.experiments.presets import PRESETS

    presets = "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items())
    p.add_argument("--preset", help=f"a paper setup ({presets})")
    p.add_argument("--dataset", help=f"{', '.join(DATASET_NAMES)}, or an image-folder dir/archive")
    p.add_argument("--data-dir", help="where named datasets are downloaded and cached")
    p.add_argument("--train-subset", type=int, metavar="N", help="stratified train subset")
    p.add_argument("--test-subset", type=int, metavar="N", help="stratified test subset")
    p.add_argument("--model", help=", ".join(MODEL_NAMES))
    if method:
        p.add_argument("--method", choices=CHOICES["method"])
    p.add_argument("--lam", type=float, help="TrAct's lambda (0.1)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    _bool_flag(p, "drop-last", "skip each epoch's last, partial batch (default off)")
    p.add_argument("--optimizer", choices=CHOICES["optimizer"])
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float, help="SGD's momentum (0.9)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--first-layer-optimizer",
        choices=OPTIMIZERS,
        help="train the first layer with its own optimizer (the paper's Fig. 9: sgd there, "
        "--optimizer adam for the rest); default: the same as the rest",
    )
    p.add_argument("--first-layer-lr", type=float, help="its peak lr (default --lr)")
    p.add_argument("--schedule", choices=CHOICES["schedule"])
    p.add_argument("--milestones", type=int, nargs="*", help="step schedule: epochs of the drops")
    p.add_argument("--gamma", type=float, help="step schedule: factor at each milestone")
    p.add_argument("--final-lr-fraction", type=float, help="cosine, vit-cifar: final / peak lr")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float)
    _bool_flag(p, "augment", "train-time augmentation: crop and flip, ... (default on)")
    p.add_argument("--rotation", type=float, metavar="DEGREES", help="random rotation (0: none)")
    _bool_flag(p, "autoaugment", "ViT-CIFAR's AutoAugment CIFAR-10 policy (default off)")
    p.add_argument(
        "--input-range",
        choices=CHOICES["input_range"],
        help="what the model sees: standardized pixels (the default), [0, 1], or raw [0, 255]",
    )
    p.add_argument("--mean", type=float, nargs=3, help="standardization (default: the train's)")
    p.add_argument("--std", type=float, nargs=3, help="standardization (default: the train's)")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=CHOICES["device"])
    p.add_argument("--amp", choices=CHOICES["amp"])
    _bool_flag(p, "compile", "torch.compile the model")
    _bool_flag(p, "progress", "progress bars where stderr is a terminal (default on)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads of torch (default on a CPU device: 1, since the CPU models are small and "
        "threads beyond the free cores slow OpenMP down many-fold on a shared machine; "
        "otherwise torch's default)",
    )


def _add_jobs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="runs trained at once, each in its own process, with the same results (default on "
        "a CPU device: as many as the usable cores hold at --threads each; otherwise 1)",
    )


def _dataset_as_given(dataset: str) -> str:
    """A dataset path as it is recorded: relative to the current directory (so that results
    name no particular machine's directories); names and relative paths as given."""
    from trainact.experiments.config import DATASET_NAMES

    if dataset in DATASET_NAMES or not os.path.isabs(os.path.expanduser(dataset)):
        return dataset
    try:
        return Path(os.path.relpath(os.path.expanduser(dataset))).as_posix()
    except ValueError:  # another drive on Windows
        return dataset


def build_config(
    args: argparse.Namespace, saved: dict[str, Any] | None = None, **fixed: Any
) -> Config:
    """Defaults (or the ``saved`` configuration of a run to resume), then the preset (for the
    epoch budget asked), then explicit options, then ``fixed`` (the method and, in a sweep, the
    budget: a preset's lr may depend on it). The Config checks itself when it is made."""
    from trainact.experiments.config import Config
    from trainact.experiments.presets import preset_overrides

    fields = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in (saved or {}).items() if k in fields
    }
    budget = fixed.get("epochs", args.epochs or values.get("epochs"))
    preset = preset_overrides(args.preset, budget) if args.preset else {}
    if getattr(args, "input_range", None) not in (None, "standardized"):
        preset.pop("mean", None)  # a preset's standardization, unused by unit or raw inputs
        preset.pop("std", None)
    values.update(preset)
    for name in fields:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = tuple(given) if isinstance(given, list) else given
    values.update(fixed)
    if isinstance(values.get("dataset"), str):
        values["dataset"] = _dataset_as_given(values["dataset"])
    return Config(**values)


def refuse_ignored(args: argparse.Namespace, cfg: Config) -> None:
    """ValueError for an option given on the command line that the run would not use, naming
    the option to use instead (presets may set such fields; only explicit options count)."""

    def given(name: str) -> bool:
        return getattr(args, name, None) not in (None, [])

    refusals = []
    if args.command in ("compare", "sweep") and given("seed"):
        refusals.append(f"{args.command} runs every seed of --seeds: use --seeds {args.seed}")
    if args.command == "sweep" and given("epochs"):
        refusals.append(f"sweep trains every budget of --budgets: use --budgets {args.epochs}")
    for name in ("milestones", "gamma"):
        if given(name) and cfg.schedule != "step":
            refusals.append(f"--{name} shapes --schedule step only, not {cfg.schedule}")
    if given("final_lr_fraction") and cfg.schedule not in ("cosine", "vit-cifar"):
        refusals.append(f"--final-lr-fraction ends a cosine schedule, not {cfg.schedule}")
    if given("momentum") and "sgd" not in (cfg.optimizer, cfg.first_layer_optimizer):
        refusals.append(
            f"--momentum is SGD's; {cfg.optimizer} keeps its β1 of 0.9 (use --optimizer sgd)"
        )
    if args.command == "train" and given("lam") and cfg.method == "baseline":
        refusals.append("--lam is TrAct's: use --method tract")
    for name in ("rotation", "autoaugment"):
        if given(name) and getattr(args, name) and not cfg.augment:
            refusals.append(f"--{name} augments the training images: drop --no-augment")
    if refusals:
        raise ValueError("; ".join(refusals) + " (the option would be ignored)")


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _parser() -> argparse.ArgumentParser:
    import trainact
    from trainact.experiments.config import Config

    parser = argparse.ArgumentParser(
        prog="trainact",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--version", action="version", version=f"trainact {trainact.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = "Defaults without --preset: " + ", ".join(
        f"{f.name}={getattr(Config(), f.name)}" for f in dataclasses.fields(Config)
    )
    seeds = " ".join(map(str, DEFAULT_SEEDS))
    p = sub.add_parser("train", help="one run", description=defaults)
    _add_config_args(p, method=True)
    p.add_argument("--out", type=Path, help="run directory (default runs/train-<time>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its saved configuration (options given must agree, "
        "except --device, --data-dir, --compile, --eval-batch-size)",
    )
    p = sub.add_parser(
        "compare", help="baseline vs TrAct over seeds (the main job)", description=defaults
    )
    _add_config_args(p, method=False)
    p.add_argument("--seeds", type=int, nargs="+", help=f"default: {seeds}, the paper's 5")
    p.add_argument(
        "--out",
        type=Path,
        help="output directory (default runs/compare-<time>); "
        "an existing one of the same comparison is resumed",
    )
    _add_jobs_arg(p)
    p = sub.add_parser(
        "sweep",
        help="epoch budgets x methods x seeds, like the paper's Fig. 3",
        description=defaults,
    )
    _add_config_args(p, method=False)
    p.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        help="epoch budgets (default: the preset's, the paper's grid; without one 1 2 4)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help=f"default: {seeds}, the paper's 5")
    p.add_argument(
        "--lams",
        type=float,
        nargs="+",
        metavar="LAMBDA",
        help="sweep TrAct's lambda too: one TrAct run per value, the baseline once per budget "
        "and seed (default: --lam only)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output directory (default runs/sweep-<time>); rerun with the same --out to resume",
    )
    _add_jobs_arg(p)
    p = sub.add_parser(
        "plot",
        help="redraw the figure of a compare or sweep directory, or draw the final accuracies "
        "of several compare directories side by side (--out)",
    )
    p.add_argument("directory", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="with several compare directories: the figure's path")
    p.add_argument(
        "--x",
        choices=["epoch", "time", "both"],
        help="a compare's accuracy.png against epochs, wall-clock seconds, or both (default)",
    )
    p.add_argument(
        "--metric",
        choices=["top1", "top5"],
        default="top1",
        help="top-1 (default) or top-5 test accuracy (recorded for more than 5 classes)",
    )
    return parser


def _plot(args: argparse.Namespace) -> str:
    """``trainact plot``: the path of the figure drawn."""
    from trainact.experiments.plot import plot_dir, plot_finals

    if len(args.directory) > 1:
        if args.out is None:
            raise ValueError("several directories make one figure: name it with --out")
        if args.x is not None:
            raise ValueError("--x sets the axes of one compare's accuracy.png: drop it")
        return str(plot_finals(args.directory, args.out, metric=args.metric))
    directory = args.directory[0]
    if args.out is not None:
        raise ValueError(
            f"one directory's figures are written into it ({directory}): drop --out, or give "
            "several compare directories to draw side by side"
        )
    if args.x is not None and (directory / "sweep.jsonl").exists():
        raise ValueError(f"{directory} holds a sweep, whose axis is the budget: drop --x")
    x = ("epoch", "time") if args.x in (None, "both") else (args.x,)
    return str(plot_dir(directory, x, args.metric))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m trainact``."""
    if (sys.argv[1:] if argv is None else argv)[:1] == ["--version"]:  # needs no extra
        import trainact

        print(f"trainact {trainact.__version__}")
        return 0
    # Parsed first, so that --help and argument errors import no more than the choices need
    # (the parser's modules need torch alone, which trainact imports anyway).
    args = _parser().parse_args(argv)
    try:
        import filelock  # noqa: F401
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401
        import PIL  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as err:
        print(f"error: {MISSING_EXTRAS} ({err})", file=sys.stderr)
        return 2
    import torch

    from trainact.experiments.compare import compare, sweep
    from trainact.experiments.presets import get_preset
    from trainact.experiments.rundir import saved_job
    from trainact.experiments.train import NonFiniteLoss, resolve_device, train

    progress = getattr(args, "progress", None) is not False
    if args.command == "train" and args.resume and args.out is None:
        print("error: --resume needs the --out of the run to continue", file=sys.stderr)
        return 1
    try:
        if args.command == "plot":
            print(f"wrote {_plot(args)}")
            return 0
        if args.command == "sweep" and args.lams is not None and args.lam is not None:
            raise ValueError("--lam and --lams both set TrAct's λ: give one of them")
        preset = get_preset(args.preset) if args.preset else None
        fixed: dict[str, Any] = {} if args.command == "train" else {"method": "baseline"}
        if args.command == "sweep":  # its configuration is each budget's; check the first one's
            budgets = args.budgets or (preset.budgets if preset else (1, 2, 4))
            fixed["epochs"] = budgets[0]
        resuming = args.command == "train" and args.resume
        saved = saved_job(args.out, "train")["config"] if resuming else None
        cfg = build_config(args, saved, **fixed)
        refuse_ignored(args, cfg)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        if args.threads is not None or resolve_device(cfg.device).type == "cpu":
            torch.set_num_threads(args.threads or 1)
        if args.command == "train":
            out = args.out or _default_out("train")
            records = train(
                cfg,
                out,
                resume=args.resume,
                progress=progress,
                on_epoch=lambda r: print(_epoch_line(r)),
            )
            top5 = records[-1].get("test_top5")
            print(
                f"final test accuracy {100 * records[-1]['test_acc']:.2f} %"
                + (f" (top-5 {100 * top5:.2f} %)" if top5 is not None else "")
                + f"; run in {out}"
            )
            return 0
        seeds = args.seeds or DEFAULT_SEEDS
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        jobs = args.jobs  # None: as many as the machine holds (runner.default_jobs)
        if args.command == "compare":
            compare(cfg, seeds, args.out or _default_out("compare"), jobs=jobs, progress=progress)
        else:
            sweep(
                cfg,
                budgets,
                seeds,
                args.out or _default_out("sweep"),
                lams=args.lams,
                config_for_budget=lambda e: build_config(args, method="baseline", epochs=e),
                jobs=jobs,
                progress=progress,
            )
    except (ValueError, OSError, RuntimeError) as err:
        kind = "stopped" if isinstance(err, NonFiniteLoss) else "error"
        print(f"{kind}: {_message(err)}", file=sys.stderr)
        return 1
    return 0


def _message(err: Exception) -> str:
    """One line: an OS error as ``path: reason``, anything else as its message."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def _epoch_line(r: dict[str, Any]) -> str:
    top5 = f" (top-5 {100 * r['test_top5']:.2f} %)" if r.get("test_top5") is not None else ""
    return (
        f"epoch {r['epoch']:>3}/{r['epochs']}: train loss {r['train_loss']:.4f} "
        f"acc {100 * r['train_acc']:.2f} %, test loss {r['test_loss']:.4f} "
        f"acc {100 * r['test_acc']:.2f} %{top5}, lr {r['lr']:.4g}, {r['seconds']:.1f} s"
    )
