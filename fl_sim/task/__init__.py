"""The task layer: datasets, partitioners, models, run-config keys and the message contract.

The bottom of fl-sim's layers (see the README's "Architecture"): every other package may import it, and it imports
no other package of the project (an import-linter contract in the test suite checks both). It is what Flower's
``task.py`` is in its app template and breaching's ``cases/{data,models}`` are there.
"""
