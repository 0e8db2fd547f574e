"""prunepilot command line. Each command lives in prunepilot.commands.<name> and registers itself."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from .errors import PrunepilotError

app = typer.Typer(
    name="prunepilot",
    help="Compress a trained network to a hard budget (MACs, params, latency, memory, sparsity).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order is the order in --help. A module that fails to import for a missing optional extra
# still lets the other commands work.
COMMAND_MODULES = ("demo", "profile", "prune", "sparsify", "quantize", "compress", "export", "runs", "train")


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"prunepilot.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"prunepilot.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(app)


_register()


def main() -> None:
    import logging

    # torchao (imported by transformers / compressed-tensors) registers enums torch now supports natively and
    # torch warns about it on every command; nothing a user can act on
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    console = Console(stderr=True)
    try:
        app()
    except PrunepilotError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every finished attempt is in OUT/journal.sqlite; continue with "
                      "`prunepilot runs resume RUN_ID --journal OUT/journal.sqlite` (the run id is printed at the start)[/]")
        sys.exit(130)
    except Exception as exc:  # a bug, not a user error: one line here, the traceback in a file
        import tempfile
        import traceback

        from .agents.llm.retry import redact

        fd, path = tempfile.mkstemp(prefix="prunepilot-traceback-", suffix=".txt")
        with open(fd, "w") as fh:
            fh.write(redact(traceback.format_exc()))
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {redact(str(exc))[:300]} "
                      f"(traceback in {path}; please report it)", markup=True, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
