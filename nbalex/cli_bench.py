"""``nbalex bench``: ``static`` here, the other subcommands imported from nbalex.benchmarks
when used (so ``nbalex --help`` stays instant)."""

import importlib
import importlib.util
import os
import subprocess
import sys

import click

from nbalex.cli_common import NbalexGroup, examples

BENCHMARKS = ("kernels", "plan", "sgemm", "train")   # modules of nbalex.benchmarks, on demand


class BenchGroup(NbalexGroup):
    """``nbalex bench``: ``static`` here, the others imported from nbalex.benchmarks on use."""

    def list_commands(self, ctx):
        found = [n for n in BENCHMARKS if importlib.util.find_spec(f"nbalex.benchmarks.{n}")]
        return sorted(set(super().list_commands(ctx)) | set(found))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None or name not in BENCHMARKS:
            return command
        if importlib.util.find_spec(f"nbalex.benchmarks.{name}") is None:
            return None
        module = importlib.import_module(f"nbalex.benchmarks.{name}")
        if isinstance(getattr(module, "command", None), click.Command):
            return module.command
        return _passthrough(name, module.main, (module.__doc__ or "").strip())


def _passthrough(name, run, doc):
    """A click command that hands its arguments to ``run(argv)`` and exits with its result."""

    @click.command(name, help=doc, context_settings={"ignore_unknown_options": True,
                                                     "allow_extra_args": True,
                                                     "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def command(ctx, args):
        ctx.exit(run(list(args)) or 0)

    return command


@click.group(cls=BenchGroup, epilog=examples("nbalex bench static",
                                             "nbalex bench kernels --help"))
def bench():
    """Measure the kernels: timings against a peer (on a GPU) or static analysis (anywhere)."""


@bench.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               epilog=examples("nbalex bench static", note="No GPU is needed: the kernels "
                                 "are compiled for sm_90 and inspected."))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def static(ctx, args):
    """Registers, spills, shared memory and SASS instruction mix of every kernel.

    Runs nbalex.cuda.static in a fresh process without NUMBA_ENABLE_CUDASIM (the compiler is
    needed, not a GPU).  Extra ARGS are passed to it: `nbalex bench static -- --help` lists
    them.
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = "import sys; from nbalex.cuda.static import main; sys.exit(main(sys.argv[1:]))"
    ctx.exit(subprocess.run([sys.executable, "-c", code, *args], env=env).returncode)
