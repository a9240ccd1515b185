"""``fl-sim defenses``: the registered client defenses, their keys, the models they need and their server steps."""

from __future__ import annotations

import typer


def defenses_cmd() -> None:
    """List the registered defenses with their keys, the models they need, their metrics and server step."""
    from clients.defenses import DEFENSES
    from strategies.steps import SERVER_STEPS

    for name, d in DEFENSES.items():
        extras = [f"keys: {', '.join(d.keys)}" if d.keys else "",
                  f"models: {', '.join(d.models)}" if d.models else "",
                  f"reports: {', '.join(d.metrics)}" if d.metrics else "",
                  "server step: yes" if name in SERVER_STEPS else ""]
        typer.echo(f"{name:<12} {d.summary}" + "".join(f"\n{'':<13}{e}" for e in extras if e))
