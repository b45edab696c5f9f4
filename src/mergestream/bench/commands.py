"""Command-line bodies of ``mergestream bench``, ``bench-suite`` and ``finetune``.

Importing this module is cheap (no torch): the parser is built from it, and each command
imports the model code only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mergestream.errors import MergestreamError

if TYPE_CHECKING:
    from mergestream.bench.suite import Suite


@contextlib.contextmanager
def _plain_errors() -> Iterator[None]:
    """Report missing files, bad values and unavailable sources without a traceback."""
    from mergestream.bench.sources import SourceUnavailableError

    try:
        yield
    except (OSError, ValueError, SourceUnavailableError) as exc:
        if isinstance(exc, MergestreamError):
            raise
        raise MergestreamError(str(exc)) from exc


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler is left out on purpose
    hf_logging.disable_progress_bar()


def cmd_suite_init(args: argparse.Namespace) -> int:
    from mergestream.bench.suite import LLM_SUITE_TEMPLATE, SUITE_TEMPLATE

    path: Path = args.suite
    if path.exists() and not args.force:
        raise MergestreamError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LLM_SUITE_TEMPLATE if args.llm else SUITE_TEMPLATE)
    print(f"wrote {path}: edit its tasks, then `mergestream finetune {path} --out ZOO`")
    return 0


def cmd_suite_check(args: argparse.Namespace) -> int:
    from mergestream.bench.instruct import InstructTask, describe_instruct
    from mergestream.bench.suite import load_suite, load_task_data
    from mergestream.bench.tasks import describe

    suite = load_suite(args.suite).select(_task_list(args.tasks))
    with _plain_errors():
        for number, spec in enumerate(suite.tasks, start=1):
            cache = args.cache or suite.data_cache
            task = load_task_data(spec, cache_dir=cache, fetch=not args.no_fetch)
            text = describe_instruct(task) if isinstance(task, InstructTask) else describe(task)
            print(f"[{number}/{len(suite.tasks)}] " + text.rstrip())
    print(f"{args.suite}: {len(suite.tasks)} tasks, all valid")
    return 0


def _steps(text: str | None) -> list[int]:
    """``--matrix-rows 4,8`` as step numbers."""
    from mergestream.errors import ConfigError

    try:
        steps = [int(t) for t in (text or "").split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--matrix-rows takes step numbers like 4,8, got {text!r}") from None
    if any(step < 1 for step in steps):
        raise ConfigError(f"--matrix-rows takes steps from 1 on, got {text!r}")
    return steps


def _task_list(text: str | None) -> list[str] | None:
    return [t for t in text.split(",") if t] if text else None


def cmd_finetune(args: argparse.Namespace) -> int:
    from mergestream.bench.suite import load_suite

    suite = load_suite(args.suite).select(_task_list(args.tasks))
    with _plain_errors():
        import torch

        from mergestream.bench.finetune import build_suite_zoo, suite_recipe

        logging.basicConfig(
            level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr
        )
        _quiet_transformers()
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        recipe = suite_recipe(
            suite,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
        )
        results = build_suite_zoo(
            args.out,
            suite,
            recipe,
            num_layers=args.num_layers,
            cache_dir=args.cache,
            device=device,
            eval_every=args.eval_every,
            fetch=not args.no_fetch,
            report=(lambda _: None) if args.quiet else (lambda line: print(line, file=sys.stderr)),
            progress=not args.quiet,
        )
    for name, info in results.items():
        print(
            f"{name:26s} pretrained {info['pretrained_test_accuracy']:.4f} "
            f"fine-tuned {info['finetuned_test_accuracy']:.4f} "
            f"loss {info['final_train_loss']:.4f} ({info['seconds_per_step']:.2f} s/step)"
        )
    print(f"zoo in {args.out}; next: mergestream bench {args.out} --suite {args.suite}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``mergestream bench``: run the benchmark, write the report, print the table."""
    from mergestream.bench.report import PLOTS_NEED, markdown_table, plots_available, write_report
    from mergestream.errors import ConfigError

    _require_transformers()
    from mergestream.bench.run import (
        DEFAULT_ALPHAS,
        SCORE_RECORD,
        StateOptions,
        expanded_tokens,
        run_benchmark,
        select_methods,
    )

    tasks = _task_list(args.tasks)
    method_tokens = _task_list(args.methods)
    try:
        methods = select_methods(method_tokens)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for token, rows in expanded_tokens(method_tokens).items():
        print(
            f"--methods {token!r} takes every row of the method ({len(rows)}): "
            f"{'; '.join(rows)}. Name a row by its label to take it alone",
            file=sys.stderr,
        )
    suite = load_suite_argument(args.suite)
    # Known before the first evaluation: a run of hours must not end in a missing plotter.
    plots = plots_available()
    if not plots:
        print(f"matplotlib is not installed: tables only, {PLOTS_NEED}", file=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with _plain_errors():
        results = run_benchmark(
            args.zoo,
            suite=suite,
            tasks=tasks,
            methods=methods,
            orders=args.orders,
            matrix_orders=args.matrix_orders,
            diagonal_only=args.matrix_diagonal,
            matrix_rows=_steps(args.matrix_rows),
            alphas=() if args.no_sweep else DEFAULT_ALPHAS,
            sweep_orders=args.sweep_orders,
            seed=args.seed,
            device=args.device,
            log=(lambda _: None) if args.quiet else (lambda line: print(line, file=sys.stderr)),
            force_base=args.force_base,
            absolute_paths=args.absolute_paths,
            progress=None if args.quiet else sys.stderr,
            full_checkpoints=args.out / "full-checkpoints" if args.as_full_checkpoints else None,
            state_options=StateOptions(
                lowrank=not args.dense_state, state_dtype=args.state_dtype
            ),
            score_record=args.out / SCORE_RECORD,
            resume=args.resume,
        )
        written = write_report(results, args.out, plots=plots)
    print(markdown_table(results))
    files = ", ".join(p.name for p in written.values())
    if plots:
        print(f"results, table and plots in {args.out} ({files})")
    else:
        print(f"results and table in {args.out} ({files}); plots skipped: {PLOTS_NEED}")
    return 0


def cmd_bench_join(args: argparse.Namespace) -> int:
    """``mergestream bench-join``: one report from runs that shared the methods."""
    from mergestream.bench.join import JoinError, join_results, load_part, results_file
    from mergestream.bench.report import PLOTS_NEED, markdown_table, plots_available, write_report

    out = args.out.resolve()
    for part in args.parts:
        if results_file(part).parent.resolve() == out:
            raise JoinError(f"{part}: --out is this part's folder; its report would be overwritten")
    joined = join_results([load_part(p) for p in args.parts], [str(p) for p in args.parts])
    plots = plots_available()
    written = write_report(joined, args.out, plots=plots)
    print(markdown_table(joined))
    files = ", ".join(p.name for p in written.values())
    skipped = "" if plots else f"; plots skipped: {PLOTS_NEED}"
    count = len(joined["methods"])
    print(f"{count} methods from {len(args.parts)} runs in {args.out} ({files}){skipped}")
    return 0


def _require_transformers() -> None:
    """The benchmark's encoder needs transformers (the `bench` extra): say so, not a traceback."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MergestreamError(
            "bench needs transformers: pip install 'mergestream[bench]'"
        ) from None


def load_suite_argument(path: Path | None) -> Suite | None:
    """The ``--suite`` of ``mergestream bench``, read and checked (None when not given)."""
    if path is None:
        return None
    from mergestream.bench.suite import load_suite

    return load_suite(path)


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``bench-suite``, ``bench-join`` and ``finetune`` to the ``mergestream`` parser."""
    p = sub.add_parser("bench-suite", help="write or check a benchmark suite file (YAML)")
    suite_sub = p.add_subparsers(dest="suite_command", required=True)
    q = suite_sub.add_parser("init", help="write a commented suite template")
    q.add_argument("suite", type=Path, help="where to write it, e.g. SUITE.yaml")
    q.add_argument("--force", action="store_true", help="overwrite an existing file")
    q.add_argument(
        "--llm",
        action="store_true",
        help="the causal-LM suite: SmolLM2-135M-Instruct on the 14 built-in instruction tasks",
    )
    q.set_defaults(func=cmd_suite_init)
    q = suite_sub.add_parser(
        "check", help="load every task of a suite and print its split's counts"
    )
    q.add_argument("suite", type=Path)
    q.add_argument("--tasks", default=None, help="comma-separated subset")
    q.add_argument("--cache", type=Path, default=None, help="data cache of built-in tasks")
    q.add_argument("--no-fetch", action="store_true", help="never download built-in sources")
    q.set_defaults(func=cmd_suite_check)

    p = sub.add_parser(
        "bench-join",
        help="one report from bench runs that shared the methods between them (same zoo and "
        "protocol, disjoint --methods); nothing is merged or scored again",
    )
    p.add_argument("parts", type=Path, nargs="+", help="report folders (or their results.json)")
    p.add_argument("--out", type=Path, required=True, help="folder of the joined report")
    p.set_defaults(func=cmd_bench_join)

    p = sub.add_parser(
        "finetune",
        help="fine-tune the suite's model (encoder or causal LM) once per task into a zoo "
        "(resumable)",
    )
    p.add_argument("suite", type=Path, help="suite file (mergestream bench-suite init)")
    p.add_argument("--out", type=Path, required=True, help="zoo folder")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    p.add_argument("--steps", type=int, default=None, help="override the suite's recipe")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="fine-tuning seed")
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train a PEFT LoRA adapter of this rank per task (on every attention and MLP "
        "weight) instead of the whole encoder; needs peft",
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="default: twice the rank")
    p.add_argument("--eval-every", type=int, default=0, help="record test accuracy every N")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--cache", type=Path, default=None, help="data cache of built-in tasks")
    p.add_argument("--no-fetch", action="store_true", help="never download built-in sources")
    p.add_argument(
        "--num-layers", type=int, default=None, help="keep only the encoder's first N layers"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_finetune)
