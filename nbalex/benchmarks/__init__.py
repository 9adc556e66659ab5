"""Benchmarks behind ``nbalex bench``: each subcommand is one module of this package.

``nbalex bench NAME`` imports ``nbalex.benchmarks.NAME`` only when it is run (so the CLI starts
fast) and uses, in this order, the module's

* ``command`` -- a ``click.Command`` (its options and ``--help`` become the subcommand's), or
* ``main(argv)`` -- a function given the remaining command-line arguments as a list of
  strings; the subcommand passes them through untouched and exits with its return value.

The subcommands are listed in ``nbalex.cli_bench.BENCHMARKS``: ``kernels`` (every layer's kernels
against the peer), ``plan`` (the step's kernel launches and their predicted GPU time,
no GPU needed), ``sgemm`` (the matrix multiply), ``train`` (whole training steps).
``static`` (registers, spills and SASS of the kernels, no GPU needed) lives in
``nbalex.cuda.static`` and runs in a subprocess without the CUDA simulator.
Shared timers, checks and tables are in :mod:`nbalex.benchmarks.common`.
"""
