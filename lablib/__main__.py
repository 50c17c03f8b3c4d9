"""Command line: `python -m lablib <command>`; `python -m lablib --help` lists the commands.

Commands import what they need when they run, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from lablib import __version__

    parser = argparse.ArgumentParser(
        prog="python -m lablib",
        description="The Parameter-Efficiency Lab's command line.",
    )
    parser.add_argument("--version", action="version", version=f"lablib {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor",
        help="check the lab environment (versions, JupyterLab extensions, Triton interpreter, data); exit 0 if ready",
        description="Check the lab environment: package versions, the JupyterLab extensions the server sees, a "
        "Triton kernel under TRITON_INTERPRET=1, and the offline data sets. Prints one line per check with the fix "
        "for each failure; exits 0 only if every check passed.",
    )
    doctor.add_argument(
        "--quick",
        action="store_true",
        help="skip the checks that start a subprocess (JupyterLab extensions, Triton kernel)",
    )
    sweep = commands.add_parser(
        "sweep",
        help="run a heavy, recorded experiment and write its results into lablib/experiments/results/",
        description="Run one of the recorded sweeps the labs check their live runs against, and write it (with "
        "its configuration, date and machine) to lablib/experiments/results/NAME.json.",
    )
    sweep.add_argument("name", choices=sorted(SWEEPS), help="which sweep")
    sweep.add_argument("--out", default=None, help="write here instead of the package's results folder")
    frontier = commands.add_parser(
        "frontier",
        help="train every technique on one task and record the parameter-accuracy frontier (resumable, cached)",
        description="Train every technique of the labs on the same task, count each with lablib.ledger and write "
        "lablib/experiments/results/frontier.json. Each point is cached by its configuration under LABLIB_CACHE, "
        "so an interrupted run resumes without recomputing finished points.",
    )
    frontier.add_argument("--points", nargs="+", metavar="NAME", default=None,
                          help="run only these points (names as listed by --list)")
    frontier.add_argument("--list", action="store_true", help="list the points and exit")
    frontier.add_argument("--out", default=None, help="write here instead of the package's results folder")
    _add_merge_parser(commands)
    return parser


def _add_merge_parser(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge safetensors checkpoints tensor by tensor (ties, dare_ties, task_arithmetic, ...)",
        description="Merge models stored as safetensors files (or folders of shards) one tensor at a time with a "
        "lablib.merging method; writes OUT/model.safetensors. Method options: --density, --weight, --lambda, "
        "--seed, --convention, --q, or any other as --param NAME=VALUE (VALUE parsed as JSON when it can be).",
    )
    merge.add_argument("--method", required=True, help="registry name, e.g. ties, dare_ties, task_arithmetic, linear")
    merge.add_argument("--base", default=None, help="the base checkpoint (needed by task-vector methods)")
    merge.add_argument("--models", nargs="+", required=True, help="the fine-tuned checkpoints")
    merge.add_argument("--out", required=True, help="output folder (or a .safetensors path)")
    merge.add_argument("--density", type=float, nargs="+", default=None, help="kept fraction (one or one per model)")
    merge.add_argument("--weight", type=float, nargs="+", default=None, help="per-model weights")
    merge.add_argument("--lambda", dest="lambda_", type=float, default=None, help="task-vector scaling coefficient")
    merge.add_argument("--seed", type=int, default=None, help="seed of the random drop (DARE)")
    merge.add_argument("--q", type=float, nargs="+", default=None, help="DAREx-q rescale")
    merge.add_argument("--convention", default=None, choices=["peft", "mergekit"], help="TIES/DARE convention")
    merge.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="any other parameter")


def _run_merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from lablib.merging.streaming import merge_safetensors

    params: dict = {}
    for name in ("density", "weight", "q"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value[0] if len(value) == 1 else value
    for name in ("lambda_", "seed", "convention"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    for item in args.param:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            parser.error(f"--param expects NAME=VALUE, got {item!r}")
        try:
            params[name] = json.loads(raw)
        except json.JSONDecodeError:
            params[name] = raw
    try:
        report = merge_safetensors(args.method, args.base, args.models, args.out, **params)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"merge failed: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report.path}: {report.num_tensors} tensors, {report.bytes_written / 1e6:.1f} MB in "
          f"{report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s)")
    return 0


def _discover_sweeps() -> dict[str, tuple[str, str]]:
    """Sweep name -> (module, function), found without importing anything: every `def record_<name>(` at the top
    level of a module in lablib/experiments/ is the sweep `<name>` with underscores as dashes. Each such function
    takes `(path | None, *, progress)`, writes its results (default: lablib/experiments/results/) and returns the
    path. A new lab registers its sweep just by defining the function."""
    import re
    from pathlib import Path

    found: dict[str, tuple[str, str]] = {}
    for source in sorted((Path(__file__).parent / "experiments").glob("*.py")):
        for function in re.findall(r"^def (record_\w+)\(", source.read_text(encoding="utf-8"), flags=re.M):
            name = function.removeprefix("record_").replace("_", "-")
            if name in found:
                raise RuntimeError(f"sweep {name!r} is defined twice: {found[name]} and {source.stem}.{function}")
            found[name] = (f"lablib.experiments.{source.stem}", function)
    return found


SWEEPS = _discover_sweeps()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # an unknown command exits 2 with the usage
    if args.command is None:
        parser.error("a command is required; `python -m lablib --help` lists them (e.g. doctor)")
    if args.command == "doctor":
        from lablib.doctor import DEFAULT_CHECKS, QUICK_CHECKS, run_doctor

        return run_doctor(checks=QUICK_CHECKS if args.quick else DEFAULT_CHECKS)
    if args.command == "sweep":
        import importlib
        from pathlib import Path

        module, function = SWEEPS[args.name]
        record = getattr(importlib.import_module(module), function)
        path = record(Path(args.out) if args.out else None, progress=True)
        print(f"wrote {path}")
        return 0
    if args.command == "frontier":
        from pathlib import Path

        from lablib.experiments import frontier as fx

        if args.list:
            for point in fx.POINTS:
                print(f"{point['name']}  ({fx.FAMILIES[point['method']]})")
            return 0
        points = None
        if args.points:
            by_name = {p["name"]: p for p in fx.POINTS}
            unknown = [n for n in args.points if n not in by_name]
            if unknown:
                parser.error(f"unknown points {unknown}; `python -m lablib frontier --list` lists them")
            points = [by_name[n] for n in args.points]
        path = fx.record_frontier(Path(args.out) if args.out else None, progress=True, points=points)
        print(f"wrote {path}")
        return 0
    if args.command == "merge":
        return _run_merge(args, parser)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse rejects unknown choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
