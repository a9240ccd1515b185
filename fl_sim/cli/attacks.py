"""``fl-sim attacks``: the registered attacks and what each may see of an update (its threat model)."""

from __future__ import annotations

import typer


def attacks_cmd() -> None:
    """List the registered attacks with what each needs beyond the update (threat model)."""
    from attacker import ATTACKS

    for name, a in ATTACKS.items():
        needs = a.threat.granted()
        typer.echo(f"{name:<10} {a.summary}" + (f" [sees: {', '.join(needs)}]" if needs else ""))


