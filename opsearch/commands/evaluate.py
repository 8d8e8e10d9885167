"""`opsearch evaluate LAYER`: train a known layer, a graph file or a formula on the proxy architectures.

A person sees one line per architecture on stderr as it finishes; ``--json`` prints one JSON
object on stdout (accuracy per architecture, details, the evaluation config) for scripts.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from opsearch.commands.common import load_plugins, plugin_parent
from opsearch.config import DEFAULT_ARCHS
from opsearch.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="train a layer on the proxy architectures", parents=[plugin_parent()],
        description="Train LAYER (a known layer's name, see `opsearch list`, or a graph JSON file) "
                    "inside each proxy architecture and report the validation accuracies.")
    p.add_argument("layer", metavar="LAYER", help="known layer name or graph JSON file")
    p.add_argument("--evaluator", default="lightning", metavar="NAME",
                   help="the evaluator plugin that scores the layer (registry `evaluators`, as a "
                        "search's evaluator_plugin; default lightning; --plugin FILE adds yours)")
    p.add_argument("--archs", help=f"comma-separated architectures (default {','.join(DEFAULT_ARCHS)})")
    p.add_argument("--dataset", help="proxy dataset (default digits)")
    p.add_argument("--data-dir", dest="data_dir", help="directory holding the dataset's files")
    p.add_argument("--download", action="store_true", default=None,
                   help="download the dataset into --data-dir if it is not there")
    p.add_argument("--steps", type=int, help="training steps per architecture")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="training batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--accelerator", help="Lightning accelerator: auto (default), cpu, gpu, ...")
    p.add_argument("--devices", help="Lightning devices: 1 (default), 2, '0,1', auto")
    p.add_argument("--strategy", help="Lightning strategy: auto (default), ddp, ddp_spawn, ...")
    p.add_argument("--precision", help="Lightning precision: 32-true (default), bf16-mixed, 16-mixed")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any evaluation option, e.g. -O arch_options.width=8 -O dataset_options.image_size=8 "
                        "-O layer_options.no_act=bn (the value as in a config file: a TOML value, "
                        "else a string)")
    p.add_argument("--logger", choices=("csv", "tensorboard"), default=None,
                   help="write learning curves with Lightning's CSVLogger or TensorBoardLogger "
                        "(tensorboard: pip install 'opsearch[tensorboard]')")
    p.add_argument("--log-dir", dest="log_dir", default=None, metavar="DIR",
                   help="where --logger writes, as DIR/<layer>/<architecture> (default ./logs)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)




def apply_options(values: dict, options: list[str]) -> dict:
    """`key=value` / `table.key=value` settings (the grammar of every command's -O, see
    opsearch/config.py) onto a dict of the lightning evaluator's options (EvalConfig fields)."""
    from opsearch import registry
    from opsearch.config import parse_assignment, set_option

    for item in options:
        path, value = parse_assignment(item)
        registry.evaluators.check_options("lightning", {path[0]: value})
        set_option(values, path, value, f"-O {item}")
    return values


def build_eval_config(args):
    from opsearch.trainers.evaluator import EvalConfig

    values: dict[str, Any] = {}
    for name in ("dataset", "data_dir", "download", "steps", "seed", "batch_size", "lr",
                 "accelerator", "strategy", "precision"):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.archs is not None:
        values["archs"] = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    from opsearch.devices import parse_devices

    devices = parse_devices(args.devices)
    if devices is not None:
        values["devices"] = devices
    values = apply_options(values, args.option)
    try:
        return EvalConfig(**values)
    except TypeError as e:
        raise UserError(f"evaluation options: {e}") from None


# flags that only the Lightning evaluator's config has
LIGHTNING_FLAGS = ("data_dir", "download", "steps", "batch_size", "lr", "accelerator", "devices",
                   "strategy", "precision", "logger", "log_dir")


def run(args) -> int:
    from opsearch import registry

    load_plugins(args)
    plugin = registry.evaluators.get(args.evaluator)  # unknown: one line with the known ones
    layer = args.layer
    from opsearch import graph, layers

    # An unknown name (the known ones listed), a malformed graph file, a text that is no formula,
    # or a graph whose output ignores x: one line now, before any output.
    plain = layers.resolve(layer)
    graph.validate(plain)
    if args.evaluator != "lightning":
        return run_plugin(args, plugin)
    config = build_eval_config(args)

    from rich.console import Console
    from rich.markup import escape

    from opsearch.trainers.evaluator import Evaluator

    # Under an external DDP launch only rank 0 talks.
    rank0 = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("", "0")
    console = Console(stderr=True, highlight=False, quiet=args.quiet or not rank0)
    if args.log_dir is not None and args.logger is None:
        raise UserError("--log-dir needs --logger csv or --logger tensorboard")
    evaluator = Evaluator(config, logger=args.logger, log_dir=args.log_dir)
    console.print(f"[bold]opsearch evaluate[/] [cyan]{escape(layer)}[/] on {escape(evaluator.data.describe())}; "
                  f"{config.steps} steps x batch {config.batch_size}, lr {config.lr:g}, seed {config.seed}")

    def progress(arch, r) -> None:
        status = f"[red]diverged at step {r.steps}[/]" if r.diverged else f"{r.steps} steps"
        console.print(f"  {arch:<14} accuracy [bold]{r.accuracy:.4f}[/]  {status}  {r.seconds:.1f} s")

    with console.status("training...", spinner="dots"):
        result = evaluator.evaluate(layer, progress=progress)
    console.print(f"  {'mean':<14} accuracy [bold]{result.mean_accuracy:.4f}[/]  total {result.seconds:.1f} s")
    if args.logger is not None:
        console.print(f"  learning curves ({args.logger}): {escape(evaluator.log_dir)}/")
    if args.json and rank0:
        out = result.to_dict()
        out["layer"] = layer
        out["formula"] = graph.formula(plain)  # how the layer was read (a formula: as tables print it)
        out["config"] = config.to_dict()
        print(json.dumps(out))
    return 0


def run_plugin(args, plugin) -> int:
    """Score the layer with an evaluator plugin through the interface alone (opsearch/evaluation.py):
    the search's path (configure, check, evaluate) with a config built from the flags."""
    from opsearch import layers
    from opsearch.config import DEFAULT_ARCHS, SearchConfig, parse_assignment, set_option
    from opsearch.evaluation import make_eval_config

    given = [f"--{name.replace('_', '-')}" for name in LIGHTNING_FLAGS if getattr(args, name, None) is not None]
    if given:
        raise UserError(f"{given[0]} is an option of the lightning evaluator, not of {args.evaluator!r}; "
                        f"set its options with -O KEY=VALUE")
    table: dict[str, Any] = {}
    for item in args.option:
        path, value = parse_assignment(item)
        set_option(table, path, value, f"-O {item}")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else list(DEFAULT_ARCHS)
    search = SearchConfig(archs=archs, dataset=args.dataset or SearchConfig().dataset,
                          seed=args.seed if args.seed is not None else 0,
                          evaluator_plugin=args.evaluator, evaluator=table)
    config = make_eval_config(search)  # unknown or bad options: one line
    plugin.check(config)
    from opsearch import registry

    # a known layer goes by name (as the search hands baselines over); a file or a formula as its graph
    layer = args.layer if args.layer in registry.layers else layers.resolve(args.layer)
    result = plugin(config).evaluate(layer)
    accuracies = {arch: float(result.accuracies[arch]) for arch in archs}
    mean = sum(accuracies.values()) / len(accuracies)
    if not args.quiet:
        for arch, accuracy in accuracies.items():
            print(f"  {arch:<14} accuracy {accuracy:.4f}", file=sys.stderr)
        print(f"  {'mean':<14} accuracy {mean:.4f}  ({args.evaluator})", file=sys.stderr)
    if args.json:
        print(json.dumps({"layer": args.layer, "evaluator": args.evaluator, "accuracies": accuracies,
                          "mean_accuracy": mean, "attrs": result.trial_attrs(),
                          "config": plugin.config_to_dict(config)}, default=str))
    return 0
