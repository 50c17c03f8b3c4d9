"""One module per lab: the seeded runs a lab shows, callable and testable at tiny sizes.

Experiments compose techniques with `lablib.train`, `lablib.cache` and `lablib.ledger`; techniques never import
experiments. Recorded heavy sweeps live in `results/` as JSON with the configuration and machine they ran on.
"""
