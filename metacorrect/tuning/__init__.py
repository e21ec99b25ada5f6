"""Ray Tune sweeps (search spaces per method, schedulers, results): see the sweeps issue."""
