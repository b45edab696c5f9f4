"""The `mergestream` command line: a thin layer over the Python API (one function per command).

torch and the library's numeric modules are imported inside the commands that need them, so
`--help` and `status` answer at once (importing torch takes a second or more).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ._version import __version__
from .allocator import return_freed_memory_to_os
from .errors import ConfigError, MergestreamError, warnings_as_lines
from .options import (
    DEFAULT_MAX_SHARD_SIZE,
    EXPORT_DTYPES,
    EXTRA_POLICIES,
    MISSING_POLICIES,
    STATE_DTYPE_NAMES,
)
from .progress import default_progress

if TYPE_CHECKING:
    from .state import MergeState


def cmd_init(args: argparse.Namespace) -> int:
    from .methods.config import parse_param_strings
    from .state import MergeState

    params = parse_param_strings(args.param)
    state = MergeState.create(
        args.state,
        args.base,
        method=args.method,
        state_dtype=args.state_dtype,
        progress=default_progress(args.quiet),
        lowrank=not args.dense,
        **params,
    )
    roles = state.status()["tensors"]
    print(
        f"created {args.state}: method {state.method!r}, base {args.base} "
        f"({roles['projected']} projected, {roles['added']} added, "
        f"{roles['copied']} copied tensors)"
    )
    return 0


def _mapping(args: argparse.Namespace) -> dict[str, object]:
    return {
        "strip_prefix": args.strip_prefix,
        "add_prefix": args.add_prefix,
        "missing": args.missing,
        "extra": args.extra,
    }


def cmd_add(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_plan(args)
    from .state import MergeState

    state = MergeState.open(args.state)
    backend = _backend(args)
    for checkpoint in args.checkpoints:
        # What a step warns about is told in one line each, after the step's own line.
        with warnings_as_lines() as warned:
            stats = state.add(
                checkpoint,
                allow_duplicate=args.allow_duplicate,
                device=args.device,
                workers=args.workers,
                progress=default_progress(args.quiet),
                verify_base=args.verify_base,
                backend=backend,
                force_base=args.force_base,
                allow_zero=args.allow_zero,
                **_mapping(args),
            )
        scalars = ", ".join(f"{k}={v:.6g}" for k, v in stats.scalars.items())
        if not args.quiet:
            print(f"step {stats.step}: merged {checkpoint} in {stats.seconds:.2f}s ({scalars})")
        for line in warned:
            print(f"mergestream: warning: {line}", file=sys.stderr)
    return 0


def _backend(args: argparse.Namespace) -> object:
    """None for this process's engine; a Ray executor for --backend ray (Ray is imported only
    then)."""
    if args.backend != "ray":
        if args.ray_address is not None or args.ray_cpus_per_task is not None:
            raise ConfigError("--ray-address and --ray-cpus-per-task need --backend ray")
        return None
    from .step.backends import resolve_executor

    return resolve_executor(
        "ray", address=args.ray_address, cpus_per_task=args.ray_cpus_per_task or 1
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from .state import MergeState
    from .step.plan import format_plan

    state = MergeState.open(args.state)
    plans = [
        state.plan(checkpoint, force_base=args.force_base, **_mapping(args))
        for checkpoint in args.checkpoints
    ]
    for offset, plan in enumerate(plans):
        plan.step += offset  # the checkpoints would be merged one after the other
    if getattr(args, "json", False):
        print(json.dumps([p.to_dict() for p in plans], indent=2))
    else:
        print("\n".join(format_plan(p) for p in plans))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .store.manifest import read_state_status

    info = read_state_status(Path(args.state), verify=args.verify)
    if args.tensors:
        from .state import MergeState

        opened = MergeState.open(args.state)
        info["classification"] = opened.classification()
        info["forms"] = opened.tensor_forms()
    health = info["health"]
    # What `mergestream watch` on this state waits for or refused (absent if it never ran).
    from .watch.journal import watch_status_lines, watch_summary

    watching = watch_summary(Path(args.state))
    if watching is not None:
        info["watch"] = watching
        if watching.get("problem"):  # an unreadable journal: not "ok", though the merge is intact
            health["ok"] = False
            health["problems"].append(watching["problem"])
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if health["ok"] else 1
    method = info["method"]
    params = ", ".join(f"{k}={v}" for k, v in method["params"].items())
    print(f"state:   {args.state}")
    print(f"method:  {method['name']} ({params})")
    print(f"base:    {info['base']}")
    roles = info.get("tensors")
    if roles is not None:
        print(
            f"tensors: {roles['projected']} projected, {roles['added']} added, "
            f"{roles['copied']} copied from the base"
        )
    storage = info.get("storage")
    if storage is not None:
        print(
            f"storage: {_size(storage['bytes'])} in the current generation; "
            + (
                f"{storage['factored']} tensors as factors (rank <= {storage['max_rank']}), "
                f"{storage['zero']} zero, the others dense"
                if storage["lowrank"]
                else "every tensor dense"
            )
        )
    print(f"steps:   {info['step']}")
    for key, value in info["scalars"].items():
        print(f"  {key} = {value:.6g}")
    for entry in info["ledger"]:
        mapping = ", ".join(f"{k}={v}" for k, v in entry.get("mapping", {}).items())
        notes = "; ".join(entry.get("notes", []))
        if entry.get("adapter"):  # a LoRA adapter: its ranks and how many tensors it adapts
            lora = entry["adapter"]
            ranks = "/".join(str(r) for r in lora["ranks"])
            mapping += f"{', ' if mapping else ''}LoRA r={ranks} on {len(lora['targets'])} tensors"
        print(
            f"  [{entry['step']}] {entry['path']}  sha256:{entry['sha256'][:16]}"
            + (f"  ({mapping})" if mapping else "")
            + (f"  [{notes}]" if notes else "")
        )
    if args.tensors:
        forms = info["forms"]
        for name, role in info["classification"].items():
            form = forms.get(name)
            if form is None:  # copied from the base: no state
                print(f"  {role:9s} {name}")
                continue
            how = form["form"] + (f" (rank {form['rank']})" if form["form"] == "factored" else "")
            print(f"  {role:9s} {name}  {how}, {_size(form['bytes'])}")
    prepared = info.get("prepared")
    if prepared is not None:
        regime = prepared["regime"] or {}
        print(
            f"prepared: step {prepared['for_step']} ({prepared['tensors']} decompositions, for "
            f"{regime.get('device', '?')}"
            + (", several workers" if regime.get("single_threaded") else ", one worker")
            + ")"
        )
        # A damaged preparation is reported, but status stays 0: it is a cache the next add
        # checks, drops and computes anew; the merge itself has lost nothing.
        damage = prepared.get("problems") or []
        if damage:
            print(f"  preparation damaged ({len(damage)} problems): the next add recomputes it")
            for problem in damage:
                print(f"  {problem}")
    if watching is not None:
        print("\n".join(watch_status_lines(watching)))
    if health["ok"]:
        checked = (
            "every tensor matches its checksum"
            if health["verified"]
            else "all files present with their recorded sizes and headers"
            + ("" if health["checksums"] else " (format 1: no checksums until the next add)")
        )
        if prepared is not None and prepared.get("problems"):
            checked += ", except the preparation's: see above"
        print(f"health:  ok ({checked})")
        return 0
    print(f"health:  DAMAGED ({len(health['problems'])} problems)")
    for problem in health["problems"]:
        print(f"  {problem}")
    return 1


def _size(nbytes: int) -> str:
    from .progress import format_size  # no torch

    return format_size(nbytes)


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .state import MergeState

    state = MergeState.open(args.state)
    if args.as_lora is not None or args.as_lora_energy is not None:
        return _export_lora(state, args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = state.export(
        args.out,
        dtype=dtype,
        max_shard_size=args.max_shard_size,
        progress=default_progress(args.quiet),
        overwrite=args.overwrite,
        verify_base=args.verify_base,
    )
    if not args.quiet:
        print(f"wrote the merged model after {state.step} steps to {out}")
    return 0


EXACT = "exact"  # `--as-lora` without a rank


def _lora_rank(text: str) -> int | str:
    if text == EXACT:  # argparse passes `const` through the type too
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rank (an integer), got {text!r}") from None


def _export_lora(state: MergeState, args: argparse.Namespace) -> int:
    import torch

    from .publish.export_lora import export_lora

    report = export_lora(
        state,
        args.out,
        rank=None if args.as_lora == EXACT else args.as_lora,
        energy=args.as_lora_energy,
        drop_other=args.lora_drop_other,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        overwrite=args.overwrite,
        verify_base=args.verify_base,
    )
    if not args.quiet:
        retained = [m.retained for m in report.modules]
        print(
            f"wrote a LoRA adapter of the merge after {state.step} steps to {report.path}: "
            f"{len(report.modules)} modules"
            + (f" (‖τ‖ retained {min(retained):.4f} to {max(retained):.4f})" if retained else "")
            + f", {len(report.modules_to_save)} saved whole, {len(report.dropped)} tensors dropped"
        )
        for name in report.dropped:
            print(f"  dropped: {name}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .state import MergeState

    state = MergeState.open(args.state)
    count = state.prepare(
        device=args.device, workers=args.workers, progress=default_progress(args.quiet)
    )
    if not args.quiet:
        print(
            f"prepared step {state.step + 1}: {count} decompositions stored with the state"
            if count
            else f"nothing to prepare for step {state.step + 1} (already prepared, or the "
            "method or the state has nothing to compute ahead)"
        )
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods.configs import describe_methods  # the configs alone: no torch

    for method in describe_methods():
        print(f"{method.name}: {method.summary}")
        for pname, ptype, default, help_text in method.parameters:
            print(f"    {pname} ({ptype}, default {default!r}): {help_text}")
        print(
            "  LoRA adapters: matrices kept as low-rank factors (exact; dense past the switch "
            "rule)"
            if method.factored
            else "  LoRA adapters: every tensor dense (the rule is elementwise or per matrix)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(workdir=args.dir, models=args.models, seed=args.seed)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.commands import cmd_bench as run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergestream",
        description="Continual model merging: fold fine-tuned checkpoints into one model as "
        "they arrive.",
    )
    parser.add_argument("--version", action="version", version=f"mergestream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a merge state for a base model")
    p.add_argument("state", help="state directory to create")
    p.add_argument(
        "--base",
        required=True,
        help="base checkpoint: .safetensors, .bin/.pt, or an HF model directory (sharded or not)",
    )
    p.add_argument("--method", default="opcm", help="merge method (see `mergestream methods`)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method parameter (repeatable); see `mergestream methods`",
    )
    p.add_argument(
        "--state-dtype",
        choices=STATE_DTYPE_NAMES,
        default=None,
        help="precision of the stored state (default: the method's; float64 for opcm)",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="keep every tensor dense, also the matrices of LoRA adapters (by default a method "
        "that can keeps them as low-rank factors, see `mergestream methods`)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("add", help="merge checkpoints into the state, one step each, in order")
    p.add_argument("state")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument(
        "--allow-duplicate",
        action="store_true",
        help="merge a checkpoint even if identical content was merged before",
    )
    p.add_argument(
        "--allow-zero",
        action="store_true",
        help="merge a checkpoint whose task vector is zero in every tensor (the base itself), "
        "which still counts as a task",
    )
    p.add_argument("--device", default="cpu", help="where kernels run, e.g. cpu or cuda")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tensors processed in parallel (default: one per CPU core, at most 8; 1 on a GPU, "
        "where each worker gets a CUDA stream of its own)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    _add_verify_base_argument(p)
    _add_mapping_arguments(p)
    _add_backend_arguments(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show what would happen (as `mergestream plan`) and write nothing",
    )
    p.set_defaults(func=cmd_add)

    p = sub.add_parser(
        "plan",
        help="check checkpoints against the state and show what add would do, writing nothing",
    )
    p.add_argument("state")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    _add_mapping_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "status",
        help="show method, params, steps, scalars, ledger and the state's health "
        "(exit status 1 if damaged)",
    )
    p.add_argument("state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensors", action="store_true", help="list each tensor's role")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read the whole state and check every tensor against its recorded checksum",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write the merged model as safetensors")
    p.add_argument("state")
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--dtype",
        choices=EXPORT_DTYPES,
        help="dtype of floating-point tensors (with --as-lora: of the factors, float32 by "
        "default, and of the tensors saved whole)",
    )
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default %(default)s); a bigger "
        "model is split into shards with an index",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="export into a non-empty directory that is not an earlier export: only the files "
        "an export writes are replaced, every other file is kept",
    )
    _add_verify_base_argument(p)
    p.add_argument("--quiet", action="store_true")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument(
        "--as-lora",
        type=_lora_rank,
        nargs="?",
        const=EXACT,
        metavar="RANK",
        help="write a PEFT LoRA adapter instead: the rank-RANK truncated SVD of each linear "
        "weight's merged task vector; without RANK, each module at its exact rank (weights "
        "kept as factors are written from them, never formed)",
    )
    lora.add_argument(
        "--as-lora-energy",
        type=float,
        metavar="FRACTION",
        help="as --as-lora, with per module the smallest rank keeping FRACTION of ‖τ‖²",
    )
    p.add_argument(
        "--lora-drop-other",
        action="store_true",
        help="with --as-lora: leave out (and list) changed tensors outside the linear layers "
        "instead of saving their modules whole (modules_to_save)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "prepare",
        help="compute the next step's decompositions now (OPCM), so the next add of the same "
        "--device and --workers only projects; the result is the same, bit for bit",
    )
    p.add_argument("state")
    p.add_argument("--device", default="cpu", help="where the next add will run its kernels")
    p.add_argument("--workers", type=int, default=None, help="as the next add's --workers")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="build a tiny synthetic stream and merge it")
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: temporary)")
    p.add_argument("--models", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench",
        help="merge a zoo of fine-tuned models with every method over task orders; "
        "report ACC/BWT, tables and plots",
    )
    p.add_argument(
        "zoo", type=Path, help="zoo folder (mergestream finetune), or checkpoints with --suite"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="report folder")
    p.add_argument("--tasks", default=None, help="comma-separated subset, in this order")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated rows: a row's name (opcm-paper, dop-exact, dop-adam, ...), a "
        "method name (all its rows) or a table label; default: the standard set; 'dop' adds "
        "DOP's reference Adam optimisation, 'all' everything",
    )
    p.add_argument("--orders", type=int, default=10, help="seeded task orders (final ACC)")
    p.add_argument(
        "--matrix-orders",
        type=int,
        default=3,
        help="orders evaluated after every step (accuracy matrix, BWT)",
    )
    p.add_argument(
        "--matrix-diagonal",
        action="store_true",
        help="on those orders, evaluate after each step only the task just merged: enough "
        "for BWT at a fraction of the cost (no per-step curves)",
    )
    p.add_argument(
        "--matrix-rows",
        default=None,
        help="with --matrix-diagonal, steps after which every task merged so far is scored "
        "all the same, comma-separated (e.g. 4,8: the ACC after 4 and 8 tasks)",
    )
    p.add_argument(
        "--as-full-checkpoints",
        action="store_true",
        help="merge each LoRA adapter into the base first (saved in OUT/full-checkpoints) and "
        "merge those full checkpoints instead: the same stream as full models",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the scores an earlier run of the same zoo recorded in OUT/scores.jsonl "
        "(every score is recorded there as it is made): a stopped run redoes its merges only",
    )
    p.add_argument(
        "--dense-state",
        action="store_true",
        help="hold every merge's sums as dense tensors, LoRA adapters included (default: "
        "adapters' sums stay low-rank factors; both give the same merge to round-off)",
    )
    p.add_argument(
        "--state-dtype",
        choices=("float32", "float64"),
        default=None,
        help="dtype of the merges' dense sums (default: the method's)",
    )
    p.add_argument("--sweep-orders", type=int, default=3, help="orders for the alpha sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip OPCM's alpha sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the models are evaluated")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: default; 1 is fastest on a machine other jobs share)",
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--suite", type=Path, default=None, help="suite file: tasks, data and checkpoints"
    )
    p.add_argument(
        "--force-base",
        action="store_true",
        help="merge LoRA adapters whose base_model_name_or_path does not name the suite's "
        "encoder (their shapes are still checked)",
    )
    p.add_argument(
        "--absolute-paths",
        action="store_true",
        help="record the zoo, suite and checkpoints in results.json by absolute path (by "
        "default: names and paths relative to the zoo or the suite file)",
    )
    p.set_defaults(func=cmd_bench)

    # Merging on the fly (`watch`, in mergestream.watch) and from a recipe (`run`, recipe.py).
    from .recipe import add_run_command
    from .watch.commands import add_commands as add_watch_commands

    add_watch_commands(sub)
    add_run_command(sub)
    from .bench.commands import add_commands as add_bench_suite_commands

    add_bench_suite_commands(sub)  # bench-suite init/check, bench-join, finetune
    return parser


def _add_backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="where the step's tensors are folded: this process (local), or tasks on a Ray "
        "cluster (ray; pip install 'mergestream[ray]'; every node must see the state, the base "
        "and the checkpoints at the same paths)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: RAY_ADDRESS, a "
        "cluster started on this machine, or a new local one)",
    )
    p.add_argument(
        "--ray-cpus-per-task",
        type=float,
        default=None,
        help="CPUs Ray reserves for each task (default 1); with --device cuda each task also "
        "takes one GPU",
    )


def _add_verify_base_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify-base",
        action="store_true",
        help="hash the base's whole content to check it is unchanged (by default its size, "
        "modification time and file headers are compared with those recorded at init)",
    )


def _add_mapping_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("fitting a checkpoint's tensor names to the base's")
    group.add_argument(
        "--strip-prefix",
        metavar="P",
        help="remove P from the front of the checkpoint's tensor names (e.g. 'model.')",
    )
    group.add_argument(
        "--add-prefix",
        metavar="P",
        help="put P in front of the checkpoint's tensor names (after --strip-prefix)",
    )
    group.add_argument(
        "--missing",
        choices=MISSING_POLICIES,
        default="error",
        help="base tensors absent from the checkpoint: refuse (error, the default) or treat "
        "them as unchanged from the base (base), e.g. for a checkpoint of one tower only",
    )
    group.add_argument(
        "--extra",
        choices=EXTRA_POLICIES,
        default="error",
        help="checkpoint tensors the base lacks: refuse (error, the default) or leave them out",
    )
    group.add_argument(
        "--force-base",
        action="store_true",
        help="merge a LoRA adapter whose base_model_name_or_path does not name the state's base "
        "(its shapes are still checked)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Freed tensors go straight back to the system, so peaks follow the live tensors.
    return_freed_memory_to_os()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (MergestreamError, ConfigError) as err:
        print(f"mergestream: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "mergestream: interrupted; the state is unchanged since its last completed step",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
