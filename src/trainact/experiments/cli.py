"""The ``trainact`` command: train, compare, sweep, plot.

    trainact compare                       # the main job: baseline vs TrAct, minutes on a CPU
    trainact compare --model vit-tiny --optimizer adam --lr 1e-3 --input-range raw
    trainact train --method tract --model resnet-narrow --epochs 10
    trainact train --out runs/t --resume   # continue an interrupted run
    trainact compare --preset resnet18-cifar10-sgd --epochs 100 --seeds 0 1 2 --device cuda
    trainact sweep --preset resnet18-cifar10-sgd --seeds 0 1 2 --device cuda --out runs/fig3
    trainact sweep --budgets 1 2 4 --dataset path/to/images.tar.gz   # train/<class>/*, test/...
    trainact sweep --budgets 1 --lams 0.01 0.1 1 10    # λ: the baseline once per budget and seed
    trainact plot runs/compare-... --x time        # accuracy against wall-clock seconds

Precedence: built-in defaults < --preset < explicit options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainact.experiments.train import Config

MISSING_EXTRAS = (
    "the trainact command needs the experiments extra: pip install 'trainact[experiments]' "
    "(numpy, pillow, tqdm, matplotlib)"
)


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help)


def _add_config_args(p: argparse.ArgumentParser, *, method: bool) -> None:
    """Every Config knob, default None so that presets and defaults fill the rest."""
    from trainact.experiments.data import DATASET_NAMES
    from trainact.experiments.models import MODEL_NAMES
    from trainact.experiments.presets import PRESETS
    from trainact.experiments.train import INPUT_RANGES

    presets = "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items())
    p.add_argument("--preset", help=f"a paper setup ({presets})")
    p.add_argument("--dataset", help=f"{', '.join(DATASET_NAMES)}, or an image-folder dir/archive")
    p.add_argument("--data-dir", help="where named datasets are downloaded and cached")
    p.add_argument("--train-subset", type=int, metavar="N", help="stratified train subset")
    p.add_argument("--model", help=", ".join(MODEL_NAMES))
    if method:
        p.add_argument("--method", choices=["baseline", "tract"])
    p.add_argument("--lam", type=float, help="TrAct's lambda (0.1)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"])
    p.add_argument("--milestones", type=int, nargs="*", help="step schedule: epochs of the drops")
    p.add_argument("--gamma", type=float, help="step schedule: factor at each milestone")
    p.add_argument("--final-lr-fraction", type=float, help="cosine: final lr / peak lr")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float)
    _bool_flag(p, "augment", "random crop and flip (default on)")
    p.add_argument(
        "--input-range",
        choices=INPUT_RANGES,
        help="what the model sees: standardized pixels (the default), [0, 1], or raw [0, 255]",
    )
    p.add_argument("--mean", type=float, nargs=3, help="standardization (default: the train's)")
    p.add_argument("--std", type=float, nargs=3, help="standardization (default: the train's)")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    _bool_flag(p, "compile", "torch.compile the model")
    _bool_flag(p, "progress", "progress bars (default on)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads of torch (default on a CPU device: 1, since the CPU models are small and "
        "threads beyond the free cores slow OpenMP down many-fold on a shared machine; "
        "otherwise torch's default)",
    )


def build_config(args: argparse.Namespace, saved: dict | None = None, **fixed: object) -> Config:
    """Defaults (or the ``saved`` configuration of a run to resume), then the preset (for the
    epoch budget asked), then explicit options, then ``fixed`` (the method and, in a sweep, the
    budget: a preset's lr may depend on it)."""
    from trainact.experiments.presets import preset_overrides
    from trainact.experiments.train import Config

    fields = {f.name for f in dataclasses.fields(Config)}
    values = {
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
    cfg = Config(**values)
    cfg.validate()
    return cfg


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _parser() -> argparse.ArgumentParser:
    from trainact.experiments.train import Config

    parser = argparse.ArgumentParser(
        prog="trainact",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = "Defaults without --preset: " + ", ".join(
        f"{f.name}={getattr(Config(), f.name)}" for f in dataclasses.fields(Config)
    )
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--out",
        type=Path,
        help="output directory (default runs/compare-<time>); "
        "an existing one of the same comparison is resumed",
    )
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
        default="both",
        help="a compare's accuracy.png against epochs, wall-clock seconds, or both (default)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m trainact``."""
    try:
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401
        import PIL  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as err:
        print(f"error: {MISSING_EXTRAS} ({err})", file=sys.stderr)
        return 2
    import torch

    from trainact.experiments.compare import compare, sweep
    from trainact.experiments.plot import plot_dir, plot_finals
    from trainact.experiments.presets import get_preset
    from trainact.experiments.rundir import saved_job
    from trainact.experiments.train import NonFiniteLoss, resolve_device, train

    args = _parser().parse_args(argv)
    progress = getattr(args, "progress", None) is not False
    if args.command == "train" and args.resume and args.out is None:
        print("error: --resume needs the --out of the run to continue", file=sys.stderr)
        return 1
    try:
        if args.command == "plot":
            if len(args.directory) > 1:
                if args.out is None:
                    raise ValueError("several directories make one figure: name it with --out")
                print(f"wrote {plot_finals(args.directory, args.out)}")
                return 0
            x = ("epoch", "time") if args.x == "both" else (args.x,)
            print(f"wrote {plot_dir(args.directory[0], x)}")
            return 0
        if args.command == "sweep" and args.lams is not None and args.lam is not None:
            raise ValueError("--lam and --lams both set TrAct's λ: give one of them")
        fixed = {} if args.command == "train" else {"method": "baseline"}
        resuming = args.command == "train" and args.resume
        saved = saved_job(args.out, "train")["config"] if resuming else None
        cfg = build_config(args, saved, **fixed)
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
            print(f"final test accuracy {100 * records[-1]['test_acc']:.2f} %; run in {out}")
        elif args.command == "compare":
            compare(
                cfg,
                args.seeds,
                args.out or _default_out("compare"),
                progress=progress,
            )
        else:
            default_budgets = get_preset(args.preset).budgets if args.preset else (1, 2, 4)
            budgets = args.budgets or default_budgets
            sweep(
                cfg,
                budgets,
                args.seeds,
                args.out or _default_out("sweep"),
                lams=args.lams,
                config_for_budget=lambda e: build_config(args, method="baseline", epochs=e),
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


def _epoch_line(r: dict) -> str:
    return (
        f"epoch {r['epoch']:>3}/{r['epochs']}: train loss {r['train_loss']:.4f} "
        f"acc {100 * r['train_acc']:.2f} %, test loss {r['test_loss']:.4f} "
        f"acc {100 * r['test_acc']:.2f} %, lr {r['lr']:.4g}, {r['seconds']:.1f} s"
    )
