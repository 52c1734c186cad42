"""Options shared by the commands, and ``-c/--config`` YAML files whose keys flags override."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from moe_local.errors import UserError


def _config_path(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def read_yaml_defaults(path: str, command: click.Command) -> dict:
    """The YAML file's keys (long flag names with underscores) as the command's defaults."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{p} is not valid YAML{where}") from None
    if not isinstance(values, dict):
        raise UserError(f"{p} must hold a mapping of option names to values")
    options = {param.name: param for param in command.params if isinstance(param, click.Option)}
    options.pop("config", None)
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in options:
            raise UserError(
                f"{p}: unknown key '{key}' for moe-local {command.name} (known: {', '.join(sorted(options))})"
            )
        _check_yaml_value(p, key, value, options[name])
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _check_yaml_value(path: Path, key, value, option: click.Option) -> None:
    """YAML gives typed values: click would silently cut 2.7 to 2 for an integer option, or take ``yes`` as a
    number; those are refused, naming the key."""
    if isinstance(option.type, click.types.IntParamType) and (isinstance(value, (bool, float))):
        raise UserError(f"{path}: '{key}' must be an integer, got {value!r}")
    if isinstance(option.type, click.types.FloatParamType) and isinstance(value, bool):
        raise UserError(f"{path}: '{key}' must be a number, got {value!r}")


class ConfigCommand(click.Command):
    """A command that takes ``-c/--config FILE.yaml``; flags given on the line win over the file."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["-c", "--config"],
                type=click.Path(dir_okay=False),
                expose_value=False,
                help="YAML file of option values (long names with underscores).",
            )
        )

    def make_context(self, info_name, args, parent=None, **extra):
        path = _config_path(args)
        if path is not None:
            extra["default_map"] = {**(extra.get("default_map") or {}), **read_yaml_defaults(path, self)}
        return super().make_context(info_name, args, parent=parent, **extra)


def model_option(f):
    return click.option(
        "--model",
        "-m",
        default="tiny",
        show_default=True,
        help="A local model folder (Hugging Face format) or a built-in name: tiny, tiny-grove.",
    )(f)


def backend_option(f):
    return click.option(
        "--backend",
        type=click.Choice(["auto", "torch", "mlx"]),
        default="auto",
        show_default=True,
        help="auto: MLX on Apple silicon, torch elsewhere.",
    )(f)


def adapter_option(f):
    return click.option(
        "--adapter-path", type=click.Path(file_okay=False), default=None, help="A router adapter folder to apply."
    )(f)


def seed_option(f):
    return click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")(f)


def device_option(f):
    return click.option(
        "--device", default=None, help="torch device (cpu, cuda, cuda:N); default: cuda when available."
    )(f)


def stdin_lines():
    """Standard input's lines as text, each checked to be UTF-8 (one-line error naming the line); a stream
    that is text already (no ``buffer``) is taken as it is."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        yield from sys.stdin
        return
    for number, raw in enumerate(stream, 1):
        yield utf8(raw, f"standard input, line {number},")


def utf8(data: bytes, what: str = "standard input") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})") from None


def task_data_options(f):
    """--data and what picks records from it: --split, --fields, --limit (tune, prepare, eval, embed)."""
    f = click.option("--limit", type=click.IntRange(min=1), default=None, help="Take only the first N records.")(f)
    f = click.option(
        "--fields",
        default=None,
        help="Map a layout the package does not know: question=COL,choices=COL (or COL+COL+...),answer=COL"
        "[,task=COL][,context=COL][,labels=COL]; a dotted name reaches into a struct column.",
    )(f)
    f = click.option("--split", default=None, help="The split of a datasets folder with several (e.g. test, dev).")(f)
    return click.option(
        "--data",
        required=True,
        type=click.Path(),
        help="Task data: JSONL, CSV, parquet, Arrow, or a Hugging Face save_to_disk folder.",
    )(f)


def prompt_options(f):
    """--format and --num-fewshot: how each record is asked (tune, prepare, eval)."""
    f = click.option(
        "--num-fewshot",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Worked examples before each prompt: from the folder's dev split, else the first records "
        "(each record left out of its own).",
    )(f)
    return click.option(
        "--format",
        type=click.Choice(["mc", "rc"]),
        default="mc",
        show_default=True,
        help="mc: lettered choices, each letter scored (MMLU's template); rc: each choice's text scored as "
        "the continuation (cloze; reports acc and acc_norm, as lm-eval).",
    )(f)
