"""`mergestream watch`: its arguments and its YAML config (`mergestream run` is `recipe.py`).

Importing this module imports neither torch nor the library's merge code, so building the
command-line parser stays cheap; the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..recipe import add_fitting_arguments, load_yaml_mapping

# Types of the WatchOptions fields that a config file or flag may set (paths are resolved
# against the config file's folder).
PATH_KEYS = ("state", "inbox", "export")
OPTION_TYPES: dict[str, type] = {
    "state": Path,
    "inbox": Path,
    "export": Path,
    "keep": int,
    "then": str,
    "then_strict": bool,
    "order": str,
    "settle": float,
    "poll": float,
    "once": bool,
    "log_json": bool,
    "polling": bool,
    "dtype": str,
    "max_shard_size": str,
    "device": str,
    "workers": int,
    "prepare": bool,
    "export_lora": int,
    "strip_prefix": str,
    "add_prefix": str,
    "missing": str,
    "extra": str,
    "force_base": bool,
    "allow_zero": bool,
}


def config_options(path: Path) -> dict[str, Any]:
    """The watch options a YAML file sets (keys as the long flags, with - or _)."""
    raw = load_yaml_mapping(path, "watch config")
    options: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        kind = OPTION_TYPES.get(name)
        if kind is None:
            raise ConfigError(
                f"{path}: unknown key {key!r}; known keys: "
                + ", ".join(k.replace("_", "-") for k in OPTION_TYPES)
            )
        if value is None:
            continue
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be true or false, got {value!r}")
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: {key} must be a {kind.__name__}, got {value!r}") from None
        if name in PATH_KEYS:
            converted = path.parent / converted
        options[name] = converted
    return options


def watch_options(args: argparse.Namespace) -> Any:
    """WatchOptions from the defaults, then the config file, then the flags given."""
    from .watcher import WatchOptions

    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(config_options(Path(args.config)))
    for name in OPTION_TYPES:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = Path(given) if OPTION_TYPES[name] is Path else given
    for name in ("state", "inbox"):
        if name not in values:
            raise ConfigError(f"watch needs {name.upper()} (an argument, or '{name}:' in --config)")
    fields = {f.name for f in dataclasses.fields(WatchOptions)}
    return WatchOptions(**{k: v for k, v in values.items() if k in fields})


def cmd_watch(args: argparse.Namespace) -> int:
    from .watcher import run_watch

    return run_watch(watch_options(args))


def add_commands(sub: Any) -> None:
    """Add `watch` to the `mergestream` subcommands."""
    p = sub.add_parser(
        "watch",
        help="merge each checkpoint that lands in a folder, once it is completely written, and "
        "publish the merged model after every step",
        description="Merge each checkpoint that lands in INBOX, once it is completely written, "
        "and publish the merged model after every step. Exit status: 0 when stopped by SIGINT "
        "or SIGTERM or when --once is done, 2 on an error, 3 when a --once run refused a "
        "checkpoint (its reason is in the log and in `mergestream status`).",
    )
    p.add_argument("state", nargs="?", help="state directory (created with init)")
    p.add_argument("inbox", nargs="?", help="folder where checkpoints arrive")
    p.add_argument(
        "--export",
        metavar="OUT",
        help="publish the merged model after every step: OUT becomes a symbolic link switched "
        "atomically to the newest complete export, written in OUT.versions/",
    )
    p.add_argument("--keep", type=int, help="exports kept in OUT.versions/ (default 3)")
    p.add_argument(
        "--then",
        metavar="CMD",
        help="shell command run after each step, with MERGESTREAM_STEP, MERGESTREAM_EXPORT, "
        "MERGESTREAM_CHECKPOINT and MERGESTREAM_STATE set; output in STATE/watch-logs/",
    )
    p.add_argument(
        "--then-strict",
        action="store_const",
        const=True,
        help="stop watching if the --then command fails (default: report it and go on)",
    )
    p.add_argument(
        "--order",
        choices=("arrival", "name"),
        help="merge in the order checkpoints become complete (default) or by name",
    )
    p.add_argument(
        "--settle",
        type=float,
        metavar="S",
        help="a complete checkpoint must be unchanged for S seconds before it is read (default 5)",
    )
    p.add_argument("--poll", type=float, metavar="S", help="seconds between scans (default 2)")
    p.add_argument(
        "--once",
        action="store_const",
        const=True,
        help="merge what is complete in the inbox now, then exit (status 3 if a checkpoint was "
        "refused)",
    )
    p.add_argument(
        "--polling",
        action="store_const",
        const=True,
        help="scan every --poll seconds only, without inotify (network filesystems)",
    )
    p.add_argument(
        "--log-json", action="store_const", const=True, help="one JSON object per event line"
    )
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="export dtype")
    p.add_argument("--max-shard-size", metavar="SIZE", help="largest exported file (5GB)")
    p.add_argument("--device", help="where kernels run, e.g. cpu or cuda (default cpu)")
    p.add_argument("--workers", type=int, help="tensors processed in parallel")
    p.add_argument(
        "--prepare",
        action="store_const",
        const=True,
        help="while waiting, compute the next step's decompositions (as `mergestream prepare`), "
        "so a landing checkpoint is merged with matrix products only; same result, bit for bit",
    )
    p.add_argument(
        "--export-lora",
        type=int,
        metavar="RANK",
        help="with --export: publish the merge as a PEFT LoRA adapter of rank RANK (as `export "
        "--as-lora RANK`) instead of the full model",
    )
    add_fitting_arguments(p)
    p.add_argument(
        "--allow-zero",
        action="store_const",
        const=True,
        help="merge a checkpoint whose task vector is zero in every tensor (the base itself), "
        "which still counts as a task (refused by default)",
    )
    p.add_argument("--config", metavar="YAML", help="read these options from a YAML file")
    p.set_defaults(func=cmd_watch)
