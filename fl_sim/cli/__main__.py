"""``python -m fl_sim.cli``: the ``fl-sim`` command (the sweep runs its cells this way)."""

from fl_sim.cli import main

main()
