"""montrage's benchmarks: run from a source checkout (``montrage bench KIND`` or ``python -m benchmarks KIND``).

Not part of the installed library: nothing under ``montrage/`` imports this package.
"""
