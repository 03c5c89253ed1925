"""The presets of ``bench_quality.py --preset``, one module each (methods, configuration, workspace); the command line,
the runner and the report stay in ``bench_quality.py``."""
