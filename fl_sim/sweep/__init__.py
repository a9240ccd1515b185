"""Sweeps: one ``fl-sim run`` per cell of a grid of run keys, resumable, in parallel, with a seed-001 table.

A sweep file is TOML with three tables::

    [sweep]                                # optional; the table layout (these are the defaults)
    description = "what this sweep is for"
    columns = ["dataset", "defense"]       # axes (or run keys) that make the table's columns
    average = ["seed"]                     # axes averaged over: mean ± std (default: ["seed"] if seed is an axis)
    baseline = { defense = "none" }        # the cells ART divides by (axis = label)

    [base]                                 # run keys shared by every cell (see ``fl-sim keys``)
    num-server-rounds = 3

    [axes]                                 # the grid: every combination of one value per axis is a cell
    seed = [0, 1]                          # a list: values of the run key of the same name
    [axes.defense]                         # a table: named variants, each a bundle of run keys
    none = { defense = "none" }
    PLD-muted = { defense = "soteria", attack-ignore-layers = "fc" }

A cell's config is the defaults, updated with ``[base]``, then with each axis's value or bundle (two axes setting
the same key is an error). Every cell is checked (:func:`fl_sim.config.resolve` and
:func:`~fl_sim.config.check_feasible`) before anything runs; a problem is a :class:`~fl_sim.config.ConfigError` of
one line, so ``fl-sim sweep`` exits with code 2 and nothing has started.

Sweep directory (``--out``, default ``sweeps-out/<file stem>``)::

    OUT/
      sweep.toml, sweep.json   the sweep file as given, and its resolved axes and table settings
      cells/<axis=label__...>/ one run directory per cell (the files of ``fl-sim run``), plus ``cell.json``
                               (the cell's axis labels and the keys it sets) and ``cell.log`` (its output)
      attic/<cell>@<time>/     unfinished cells moved aside before they are redone (nothing is deleted)
      table.md, table.csv      seed 001's layout, rebuilt by ``fl-sim report OUT`` (:mod:`fl_sim.report`)
      accuracy-*.png, privacy-utility.png, montage-*.png

Resuming: a cell is *done* when its ``summary.json`` says ``completed`` with every round recorded; running the same
command again skips done cells, moves every other existing cell directory to ``attic/`` and runs it again. A done
cell whose config differs from what the sweep file now asks (other than the runtime keys in
:data:`RUNTIME_KEYS`) stops the sweep with an error rather than mixing two experiments in one table.

Parallelism: ``--jobs N`` runs N cells at once, each ``python -m fl_sim.cli run ...`` in its own process: forked
from the cell host (:mod:`fl_sim.cellhost`, which has imported what that command imports), or a new interpreter
with ``fork=False`` (``--fresh-processes``). The cores this process may use are split into N disjoint groups; each
cell is pinned to its group (CPU affinity, inherited by its Ray workers, and Ray is sized to it by
:func:`fl_sim.simulation.backend_config`) and its ``client-num-cpus`` is capped to the group's size, so cells never
compete for a core. When the sweep dies, its cells get SIGINT (``PR_SET_PDEATHSIG`` on Linux; a forked cell's
parent is the cell host, which exits with the sweep) and stop after their round as after a Ctrl-C; they hold the
sweep's lock until they have exited.
"""

from fl_sim.sweep.plan import Cell, cell_id, cell_states, is_done, plan
from fl_sim.sweep.runner import SweepResult, default_out, run_sweep, split_cpus
from fl_sim.sweep.spec import Axis, SweepSpec, load_sweep

__all__ = ["Axis", "Cell", "SweepResult", "SweepSpec", "cell_id", "cell_states", "default_out", "is_done",
           "load_sweep", "plan", "run_sweep", "split_cpus"]
