"""The cell host's preload (``multiprocessing.set_forkserver_preload(["fl_sim.cellhost.preload"])``): importing it
sets :data:`fl_sim.cellhost.HOST_ENV` and imports :data:`fl_sim.cellhost.PRELOAD`. Only the fork server imports it.
"""

from fl_sim.cellhost import preload

preload()
