"""The ``moe-local`` command line: the group, lazy command loading, YAML configs, exit codes.

Exit codes (docs/architecture.md): 0 success, 2 a usage or input error (one line on stderr), 1 anything
unexpected (one line; the traceback only with MOE_LOCAL_DEBUG=1). Commands are imported when
invoked, so ``moe-local --help`` never imports torch or mlx.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback

import click

from . import __version__
from .errors import UserError

# name -> "module:attribute" of the click command; one line per command.
COMMANDS = {
    "demo": "moe_local.commands.demo:demo",
    "chat": "moe_local.commands.chat:chat",
    "fuse": "moe_local.commands.fuse:fuse",
    "generate": "moe_local.commands.generate:generate",
    "info": "moe_local.commands.info:info",
    "embed": "moe_local.commands.embed:embed",
    "prepare": "moe_local.commands.prepare:prepare",
    "tune": "moe_local.commands.tune:tune",
    "eval": "moe_local.commands.eval:eval_",
    "serve": "moe_local.commands.serve:serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="moe-local")
def cli():
    """Tune the routers of Mixture-of-Experts models on your own tasks (RoMA), chat with them,
    and run grouped and Grove adjugate experts on MLX or PyTorch. Nothing is downloaded."""


def _one_line(e: click.ClickException) -> str:
    """click's message on one line, with where to find the options (click prints usage, hint, message)."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    return f"{message} (see '{ctx.command_path} --help')" if ctx is not None else message


def main(argv=None) -> None:
    debug = bool(os.environ.get("MOE_LOCAL_DEBUG"))
    if hasattr(signal, "SIGPIPE"):  # `moe-local … | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code = cli.main(args=argv, prog_name="moe-local", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `moe-local`: the help text
        e.show()
        code = e.exit_code
    except click.ClickException as e:  # usage errors too: one line, as every other refusal
        print(f"moe-local: error: {_one_line(e)}", file=sys.stderr)
        code = e.exit_code
    except click.exceptions.Abort:
        print("moe-local: interrupted", file=sys.stderr)
        code = 130
    except UserError as e:
        print(f"moe-local: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("moe-local: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # anything unexpected: one line, traceback on request
        if debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        print(
            f"moe-local: unexpected error: {type(e).__name__}: {first} (run with MOE_LOCAL_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
