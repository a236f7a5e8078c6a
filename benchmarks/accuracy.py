"""How accurate is trainact's gradient at every input scale? Real photos, float64 reference.

    python benchmarks/accuracy.py                    # the CPU's default, the float32 path, float64
    python benchmarks/accuracy.py --device cuda --matmuls strict tf32   # also with TF32 allowed
    python benchmarks/accuracy.py --policies h100 rtx4090 host-solve    # GPUs' paths on the CPU

For each case of :data:`trainact.testing.ACCURACY_CASES` (a stem and an input scale, on real
CIFAR-10 photos from the package's embedded subset), one float32 layer's weight gradient with
TrAct is compared with G·(XᵀX/n + λI)⁻¹ computed in float64 from explicitly extracted patches,
λ = 0.1, with the same plain gradient G; for n < d (the n×n form) with the float64 answer for
the same input (:func:`trainact.testing.exact_tract_grad`). Prints the relative Frobenius error
of each case for ``statistics_dtype=None`` (the device's policy), ``torch.float32`` (the path of
devices without fast float64) and ``torch.float64``, next to its target. ``--matmuls tf32`` runs
with TF32 allowed (``torch.set_float32_matmul_precision("high")`` and cuDNN TF32 on), as many users
train on GPUs; otherwise float32 matmuls and convolutions are strict. cuDNN runs deterministic,
so that the plain copy's G and the TrAct layer's are the same. ``--many-chunks N`` adds two
cases on N and N/4 photos whose statistics take many chunks; ``--cases`` keeps the cases whose
name matches a regular expression. ``--policies`` runs the tables under other devices' precision
policies as well (forced with :func:`trainact.maths.precision.use_precision`, so that the CPU
runs a GPU's paths: the H100's float64 product, the RTX 4090's split product with its int8
exact part, the host solve of devices without float64). ``--json`` also writes the tables as
JSON. Needs the experiments extra (numpy) to load the photos.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from trainact.maths.precision import (
    HOST_SOLVE,
    Precision,
    gpu_precision,
    precision_for,
    use_precision,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository-root `testing`
from testing.accuracy_cases import (  # noqa: E402
    ACCURACY_CASES,
    STATISTICS_DTYPES,
    case_error,
    case_target,
    many_chunk_cases,
    photos,
)
from testing.harness import LAM  # noqa: E402


@contextmanager
def float32_matmuls(tf32: bool) -> Iterator[None]:
    """Strict float32 matmuls and convolutions, or TF32 allowed for both; cuDNN deterministic.
    The previous settings are restored afterwards."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
    )
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = saved[1:]


#: The policies ``--policies`` can force, besides the device's own (``device``).
POLICIES: dict[str, Precision] = {
    "h100": gpu_precision("NVIDIA H100 80GB HBM3", 9, 0, memory=80 * 10**9),
    "rtx4090": gpu_precision("NVIDIA GeForce RTX 4090", 8, 9, memory=24 * 10**9),
    "host-solve": HOST_SOLVE,
}


def table(cases: list, images: torch.Tensor, tf32: bool, name: str) -> tuple[list[dict], int]:
    """Print one table (a row per case, a column per statistics dtype) under the policy
    ``name``; its rows and the number of cells over their target."""
    setting = "TF32 allowed" if tf32 else "strict float32"
    print(f"\n{name} policy, {setting}: relative error (target)")
    columns = list(STATISTICS_DTYPES)
    print("| case | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    rows, over = [], 0
    forced = contextlib.nullcontext() if name == "device" else use_precision(POLICIES[name])
    with float32_matmuls(tf32), forced:
        for case in cases:
            cells, row = [], {"case": case.name}
            for column, dtype in STATISTICS_DTYPES.items():
                limit = case_target(case, dtype)
                error = case_error(case, images, dtype)
                ok = error <= limit
                over += not ok
                row[column] = {"error": error, "target": limit, "ok": ok}
                cells.append(f"{error:.1e} ({limit:.0e}){'' if ok else ' **over**'}")
            rows.append(row)
            print(f"| {case.name} | " + " | ".join(cells) + " |", flush=True)
    return rows, over


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument(
        "--matmuls",
        choices=["strict", "tf32"],
        nargs="+",
        default=["strict"],
        help="one table per setting: strict float32, or TF32 allowed (matmuls and cuDNN)",
    )
    parser.add_argument(
        "--many-chunks", type=int, metavar="N", help="add two cases on N and N/4 photos"
    )
    parser.add_argument(
        "--cases", metavar="REGEX", help="only the cases whose name matches (not --many-chunks')"
    )
    parser.add_argument(
        "--policies",
        choices=["device", *POLICIES],
        nargs="+",
        default=["device"],
        help="the device's own policy and/or others forced on it (a GPU's paths on the CPU)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = [case for case in ACCURACY_CASES if re.search(args.cases or "", case.name)]
    count = 256
    if args.many_chunks:
        cases += many_chunk_cases(args.many_chunks, max(args.many_chunks // 4, 1))
        count = max(count, args.many_chunks)
    images = photos(count, device=device)
    policy = precision_for(device, None, torch.float32).describe()
    print(f"lambda={LAM}, torch {torch.__version__}, device {device}; policy: {policy}")
    start = time.perf_counter()
    tables = []
    for name in args.policies:
        if name != "device":
            print(f"\n{name}: {POLICIES[name].describe()}")
        for setting in args.matmuls:
            rows, over = table(cases, images, setting == "tf32", name)
            tables.append({"policy": name, "tf32": setting == "tf32", "over": over, "rows": rows})
    over = sum(t["over"] for t in tables)
    print("\nevery case within its target" if not over else f"\n{over} cells over their target")
    if args.json:
        result = {
            "benchmark": "accuracy",
            "device": str(device),
            "policy": policy,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "lambda": LAM,
            "seconds": time.perf_counter() - start,
            "over": over,
            "tables": tables,
        }
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
