"""The ``fl-sim`` command line: one module per command (as Flower's own CLI is built).

Every command turns bad input into one line on stderr naming the key, the value and what is allowed, and exits
with code 2 before any simulation starts. Command modules import their heavy dependencies (torch, Flower, Ray) only
when they run.
"""

from __future__ import annotations

import os
import sys

import typer

from fl_sim.cli import attack, attacks, defenses, deploy, export, keys, rank, report, run, sweep
from fl_sim.task.keys import ConfigError

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fl-sim: gradient-leakage attacks and defenses in Flower federations.")
_HELP = {"help_option_names": ["-h", "--help"]}
cli.command(context_settings=_HELP)(run.run)
cli.command()(keys.keys)
cli.command()(report.report)
cli.command(context_settings=_HELP)(sweep.sweep)
cli.command("attacks")(attacks.attacks_cmd)
cli.command("defenses")(defenses.defenses_cmd)
cli.command()(rank.rank)
cli.command(context_settings=_HELP)(attack.attack)
cli.command(context_settings=_HELP)(deploy.deploy)
cli.command(context_settings=_HELP)(export.export)


def main() -> None:
    """Console-script entry point."""
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With 2 threads on 2 busy cores a
    # spinning barrier made one 10-iteration attack take 27-50 s instead of 1-2 s (benchmarks: docs/deployment.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        cli()
    except ConfigError as exc:
        fail_msg = f"fl-sim: error: {exc}"
        print(fail_msg, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
