"""What every ``nbalex`` command shares: errors reported as one line, option types and
callbacks, example epilogs (:mod:`nbalex.cli` has the commands)."""

import math
import sys

import click


def user_errors():
    """The exception classes that mean "the input is wrong", not "the program is wrong".

    ValueError covers the project's own: ConfigError (configs), DataError (packed data and
    images), the checkpoint reader's and the checks of the model, loader and training loop.
    """
    from nbalex.io.errors import DataError
    from nbalex.train import Diverged
    errors = [ValueError, DataError, OSError, MemoryError, Diverged]
    driver = sys.modules.get("numba.cuda.cudadrv.driver")   # loaded only if CUDA was used
    for name in ("CudaSupportError", "CudaAPIError", "CudaDriverError"):
        cls = getattr(driver, name, None)        # no GPU, no driver, out of device memory
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


def one_line(exc):
    """A one-line description of ``exc`` for ``Error: ...``."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        text = f"out of memory ({text}); try a smaller --batch-size"
    return text


class OneLineUsageError(click.ClickException):
    """A usage mistake (missing file, bad option value) reported as one line, exit status 2."""

    exit_code = 2


class NbalexGroup(click.Group):
    """A click group that reports the project's errors as one line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise OneLineUsageError(f"{exc.format_message()} (see '{where} --help')") from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if isinstance(exc, user_errors()):
                raise click.ClickException(one_line(exc)) from None
            raise


def hdf5_file(ctx, param, value):
    """Option callback: ``value`` must be an existing HDF5 file (None passes through)."""
    if value is None:
        return None
    import h5py
    if not h5py.is_hdf5(value):
        writer = "nbalex train" if param.name == "checkpoint" else "nbalex pack"
        raise click.ClickException(f"{param.opts[0]} {value} is not an HDF5 file "
                                   f"(expected a file written by `{writer}`)")
    return value


def gpu_list(ctx, param, value):
    try:
        gpus = tuple(int(g) for g in value.split(",") if g.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected GPU numbers such as 0 or 0,1") from None
    if not gpus or len(gpus) > 2 or any(g < 0 for g in gpus):
        raise click.BadParameter(f"{value!r}: give one or two GPU numbers, such as 0 or 0,1")
    return gpus


class FiniteFloat(click.FloatRange):
    """A float option that refuses ``nan`` and ``inf`` (a usage error, exit 2), optionally in
    a range (FloatRange's arguments).  Every float option of every command uses it."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


H5 = click.Path(exists=True, dir_okay=False)


def examples(*lines, note=""):
    """A click epilog listing example command lines, kept unwrapped (click's \\b marker)."""
    text = "Example" + ("s" if len(lines) > 1 else "") + ":\n\n\b\n" + "\n".join(
        "  " + line for line in lines)
    return text + ("\n\n" + note if note else "")
