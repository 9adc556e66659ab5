"""The ``nbalex`` command line: thin wrappers that parse options and call the library.

Mistakes a user can make (a wrong path, a PNG where an HDF5 file belongs, a checkpoint of
another model, a batch that does not fit the GPU) end as one ``Error: ...`` line on stderr and
a non-zero exit: :class:`NbalexGroup` turns the project's error classes into
``click.ClickException`` in one place.  Heavy modules (numba, h5py, matplotlib) are imported
inside the commands so ``nbalex --help`` is instant.
"""

import json
import sys

import click

from nbalex.cli_bench import bench
from nbalex.cli_common import H5, FiniteFloat, NbalexGroup, examples, gpu_list, hdf5_file
from nbalex.cli_lab import lab

BACKENDS = click.Choice(["auto", "cuda", "cpu", "reference"])
SHOW_SKIPPED = 10             # skipped files pack names on stderr; the rest are counted


@click.group(cls=NbalexGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=examples("nbalex synth demo/images --classes 6",
                              "nbalex pack demo/images/train demo/train.h5 --size 64",
                              "nbalex train --help",
                              note="`make demo` runs the whole tour."))
@click.version_option(package_name="nbalex")
def cli():
    """nbalex: AlexNet (Krizhevsky, Sutskever & Hinton, 2012) from scratch in Numba."""


cli.add_command(bench)
cli.add_command(lab)


def main(argv=None):
    """Console-script entry point.

    Under a launcher (``mpiexec -n N``, ``srun``) the process group is joined and this
    rank's threads are sized before anything imports numba; only ``nbalex train`` runs
    there (synchronous data parallelism, see :mod:`nbalex.parallel_run`).  An error on any
    rank is one ``Error: rank R of N: ...`` line and ends the whole job.  Outside a
    launcher nothing of this happens.
    """
    from nbalex.distributed import launcher, world as process_group
    try:
        started = launcher.detect()
    except launcher.LauncherError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)
    if started is None:
        return cli(prog_name="nbalex", args=argv)
    w = process_group.init_or_exit()
    process_group.size_threads(w)
    if w.size == 1:
        return cli(prog_name="nbalex", args=argv)
    code = w.run(_rank_main, w, sys.argv[1:] if argv is None else list(argv))
    sys.exit(code or 0)


def _rank_main(w, args):
    """One rank's command line: ``nbalex train`` only; click's errors end the job (one line,
    rank 0's when every rank has the same error).  Returns the exit status of a command
    that stopped on request (every rank stops at the same step)."""
    command = next((a for a in args if not a.startswith("-")), None)
    if command != "train" and not {"-h", "--help", "--version"} & set(args):
        w.abort(f"only `nbalex train` runs under a launcher of {w.size} processes "
                f"(got {command or 'no command'}); run the others without mpiexec/srun", 2,
                alike=True)
    try:
        code = cli.main(args=args, prog_name="nbalex", standalone_mode=False)
    except click.ClickException as error:
        w.abort(error.format_message(), error.exit_code, alike=True)
    except click.Abort:
        w.abort("aborted", 1)
    return code if isinstance(code, int) else 0


# ----------------------------------------------------------------------------- data
@cli.command(epilog=examples("nbalex synth demo/images --classes 6 --train-per-class 120 "
                             "--val-per-class 30"))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--classes", default=10, show_default=True, type=int,
              callback=lambda ctx, param, value: _synth_classes(value),
              help="Number of classes, 1 to 10: one shape each (disc, square, triangle, plus, "
                   "ring, stripes, checker, star, diagonal cross, frame).")
@click.option("--train-per-class", default=100, show_default=True, type=click.IntRange(1),
              help="Training images per class.")
@click.option("--val-per-class", default=20, show_default=True, type=click.IntRange(1),
              help="Validation images per class.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option("--force", is_flag=True, help="OUT_DIR may hold an earlier synth's images: "
              "remove them first (without it a non-empty OUT_DIR is refused).")
def synth(out_dir, classes, train_per_class, val_per_class, seed, force):
    """Write a small synthetic image dataset as OUT_DIR/train/CLASS/*.jpg and OUT_DIR/val/...

    Each class is one shape (disc, square, triangle, ...) at a random place, size, rotation
    and colour on a textured background: colour says nothing about the class, so the network
    has to learn spatial filters, and a small one does so in minutes.
    """
    from nbalex.io.synth import synth as write_synth
    summary = write_synth(out_dir, classes=classes, train_per_class=train_per_class,
                          val_per_class=val_per_class, seed=seed, force=force)
    click.echo(f"wrote {summary['train']} training and {summary['val']} validation images of "
               f"{len(summary['classes'])} classes under {out_dir}")


def _synth_classes(value):
    """--classes of synth: 1 up to the number of shapes synth can draw."""
    from nbalex.io.synth import class_names
    try:
        class_names(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@cli.command(epilog=examples("nbalex pack ~/imagenet/train train.h5 --workers 8",
                             "nbalex pack ~/imagenet/val val.h5 --classes-from train.h5"))
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--size", default=256, show_default=True, type=click.IntRange(8),
              help="Side of the stored square images (shorter side resized, centre crop).")
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Decoding processes [default: the number of CPUs].")
@click.option("--classes-from", type=H5, callback=hdf5_file,
              help="Use this packed file's class list (pack validation data this way).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never the "
              "--classes-from file).")
@click.pass_context
def pack(ctx, src, out, size, workers, classes_from, force):
    """Pack a folder of images (SRC/CLASS/IMAGE) into one HDF5 file OUT.

    Stores uint8 images, labels, class names, the per-pixel mean and the RGB PCA that the
    training loader needs.  Unreadable images are skipped, counted and named; a class left
    with no image is warned about.  An existing OUT is refused unless --force.
    """
    from nbalex.io.pack import Stopped, pack as write_pack
    try:
        summary = write_pack(src, out, size=size, workers=workers, classes_from=classes_from,
                             progress=True, force=force)
    except Stopped as stop:
        click.echo(f"Stopped: {stop}; {out} was not written", err=True)
        ctx.exit(128 + stop.signum)
    click.echo(f"packed {summary['images']} images of {summary['classes']} classes "
               f"({summary['size']}x{summary['size']}) into {out}: {summary['skipped']} skipped, "
               f"{summary['seconds']:.1f} s")
    for line in summary["notes"]:
        click.echo(f"note: {line}", err=True)
    skipped = summary["skipped_files"]
    for line in skipped[:SHOW_SKIPPED]:
        click.echo(f"  skipped {line}", err=True)
    if len(skipped) > SHOW_SKIPPED:
        click.echo(f"  ... and {len(skipped) - SHOW_SKIPPED} more (all listed in the file's "
                   f"skipped_files)", err=True)
    for name in summary["empty_classes"]:
        click.echo(f"warning: class {name} has no images in {out} (an empty folder, or every "
                   f"file unreadable)", err=True)


# --------------------------------------------------------------------------- training
TRAIN_EPILOG = examples(
    "nbalex train --data demo/train.h5 --val demo/val.h5 --model alexnet-mini \\",
    "    --epochs 8 --batch-size 32 --out demo/run",
    "nbalex train --data demo/train.h5 --val demo/val.h5 --epochs 12 --out demo/run --resume",
    "nbalex train --data train.h5 --val val.h5 --model alexnet --gpus 0,1 --out runs/alexnet",
    note="Writes RUN_DIR/log.jsonl, checkpoint.h5 (every epoch and on Ctrl-C), curves.png and "
         "filters.png.  Options marked (run setting) are stored in the checkpoint; --resume "
         "reuses them.")


@cli.command(epilog=TRAIN_EPILOG)
@click.option("--data", required=True, type=H5, callback=hdf5_file,
              help="Packed training data (from `nbalex pack`).")
@click.option("--val", required=True, type=H5, callback=hdf5_file,
              help="Packed validation data (pack it with --classes-from the training file).")
@click.option("--model", default=None, help="alexnet, alexnet-mini or a config .toml "
              "(run setting) [default: alexnet].")
@click.option("--epochs", default=90, show_default=True, type=click.IntRange(1),
              help="Train until this many epochs are done (counting resumed ones).")
@click.option("--batch-size", type=click.IntRange(1), help="Images per step (run setting) "
              "[default: 128].")
@click.option("--lr", type=FiniteFloat(0, min_open=True), help="Initial learning rate "
              "(run setting) [default: 0.01].")
@click.option("--momentum", type=FiniteFloat(0, 1), help="Momentum (run setting) "
              "[default: 0.9].")
@click.option("--weight-decay", type=FiniteFloat(0), help="Weight decay (run setting) "
              "[default: 0.0005].")
@click.option("--schedule", type=click.Choice(["plateau", "step"]), help="plateau: lr/10 when "
              "validation top-1 error stops improving, at most 3 times (the paper); step: lr/10 "
              "every --step-epochs (run setting) [default: plateau].")
@click.option("--step-epochs", type=click.IntRange(1), help="Epochs between drops for "
              "--schedule step (run setting) [default: 30].")
@click.option("--seed", type=int, help="Seed for initialisation, crops, flips, colour noise "
              "and dropout (run setting) [default: 0].")
@click.option("--backend", type=BACKENDS, default="auto", show_default=True,
              help="auto = cuda when a GPU is present, else cpu.")
@click.option("--gpus", default="0", show_default=True, callback=gpu_list,
              help="GPU numbers for the towers, e.g. 0,1 for the paper's two GPUs (cuda "
                   "backend only).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder (RUN_DIR).")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR where it stopped.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
              help="Processes reading the packed file (0: the main process).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar per epoch on stderr.")
@click.option("--stop-after-steps", type=click.IntRange(1), hidden=True,
              help="Act as if Ctrl-C were pressed after this many steps (for tests).")
@click.pass_context
def train(ctx, data, val, model, epochs, batch_size, lr, momentum, weight_decay, schedule,
          step_epochs, seed, backend, gpus, out_dir, resume, workers, progress,
          stop_after_steps):
    """Train a network with SGD, momentum and weight decay; validate after every epoch.

    An output layer with outputs = "classes" (alexnet, alexnet-mini) takes the training
    data's class count.  SIGTERM, SIGHUP and SIGUSR1 stop a run like Ctrl-C: after the
    current step, with its position saved for --resume.
    """
    from nbalex import train as training
    _check_gpus_need_cuda(ctx, backend)
    given = dict(model=model, batch_size=batch_size, lr=lr, momentum=momentum,
                 weight_decay=weight_decay, schedule=schedule, step_epochs=step_epochs,
                 seed=seed)
    settings = training.Settings(**{k: v for k, v in given.items() if v is not None})
    try:
        summary = training.train(data, val, out_dir, settings, epochs, backend=backend,
                                 gpus=gpus, resume=resume, given=given, workers=workers,
                                 progress=progress, stop_after_steps=stop_after_steps,
                                 report=lambda line: click.echo(line, err=True),
                                 gpus_given=_given(ctx, "gpus"))
    except (training.Interrupted, training.Quit) as stop:
        if _is_root():
            click.echo(f"Stopped: {stop}", err=True)
        ctx.exit(stop.exit_code)
    if summary["history"] and _is_root():
        last = summary["history"][-1]
        click.echo(f"done: {summary['epochs']} epochs, top-1 error "
                   f"{100 * last['top1_error']:.2f}%, top-5 error {100 * last['top5_error']:.2f}%;"
                   f" checkpoint {summary['checkpoint']}")


def _given(ctx, name):
    from click.core import ParameterSource
    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _is_root():
    """False on ranks other than 0 of a data-parallel job (they print nothing)."""
    from nbalex.distributed import world as process_group
    return process_group.init().is_root


def _check_gpus_need_cuda(ctx, backend):
    """Refuse ``--gpus`` given with a backend that runs on the host (a usage error)."""
    if not _given(ctx, "gpus"):
        return
    from nbalex.backends import resolve
    resolved = resolve(backend)
    if resolved != "cuda":
        how = f"backend {backend} resolves to {resolved}: no GPU found" if backend == "auto" \
            else f"backend {resolved} runs on the host's cores"
        raise click.UsageError(f"--gpus places towers on GPUs, but {how}; leave --gpus out "
                               f"or use --backend cuda", ctx)


# ------------------------------------------------------------------------ inference
@cli.command("eval", epilog=examples(
                 "nbalex eval --checkpoint demo/run/checkpoint.h5 --data demo/val.h5",
                 "nbalex eval --checkpoint run/checkpoint.h5 --data val.h5 --ten-crop --json"))
@click.option("--checkpoint", required=True, type=H5, callback=hdf5_file,
              help="A checkpoint written by `nbalex train`.")
@click.option("--data", required=True, type=H5, callback=hdf5_file,
              help="Packed data to evaluate on.")
@click.option("--ten-crop", is_flag=True, help="Average the softmax over the 4 corner and "
              "centre crops and their mirrors (the paper's test-time views).")
@click.option("--batch-size", type=click.IntRange(1), help="Images per forward pass; with "
              "--ten-crop the network sees 10 views of each [default: 128, 12 with --ten-crop].")
@click.option("--backend", type=BACKENDS, default="auto", show_default=True,
              help="auto = cuda when a GPU is present, else cpu.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
              help="Processes reading the packed file (0: the main process).")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object {"top1_error", "top5_error", "loss", "images"}.')
def evaluate(checkpoint, data, ten_crop, batch_size, backend, workers, as_json):
    """Top-1 and top-5 error and the mean loss of a checkpoint on packed data."""
    from nbalex.inference import evaluate_checkpoint
    batch_size = batch_size or (12 if ten_crop else 128)
    scores = evaluate_checkpoint(checkpoint, data, ten_crop=ten_crop, batch_size=batch_size,
                                 backend=backend, workers=workers, progress=not as_json)
    if as_json:
        click.echo(json.dumps({k: scores[k] for k in ("top1_error", "top5_error", "loss",
                                                      "images")}))
    else:
        click.echo(f"top-1 error {100 * scores['top1_error']:.2f}%  top-5 error "
                   f"{100 * scores['top5_error']:.2f}%  loss {scores['loss']:.4f}  "
                   f"({scores['images']} images, {'10 crops' if ten_crop else 'centre crop'})")


@cli.command(epilog=examples("nbalex predict --checkpoint demo/run/checkpoint.h5 --top 3 "
                             "photo.jpg other.png",
                             "nbalex predict --checkpoint demo/run/checkpoint.h5 --json "
                             "demo/images/val"))
@click.option("--checkpoint", required=True, type=H5, callback=hdf5_file,
              help="A checkpoint written by `nbalex train` (holds classes and mean image).")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--top", default=5, show_default=True, type=click.IntRange(1),
              help="How many classes to list per image.")
@click.option("--backend", type=BACKENDS, default="auto", show_default=True,
              help="auto = cuda when a GPU is present, else cpu.")
@click.option("--json", "as_json", is_flag=True, help='Print a JSON list, one entry per image: '
              '{"image", "top": [...]}, or {"image", "error"} for one that could not be read.')
@click.pass_context
def predict(ctx, checkpoint, images, top, backend, as_json):
    """The most likely classes of image files, with their probabilities.

    IMAGES are files or folders (every image file under a folder, recursively, in sorted
    order).  Every readable image is answered; each unreadable one is named on stderr and
    the exit status is then 1.
    """
    from nbalex.inference import predict as run_predict
    notes = []
    results = run_predict(checkpoint, list(images), top=top, backend=backend, notes=notes)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    failed = [r for r in results if "error" in r]
    if as_json:
        click.echo(json.dumps(results))
    else:
        for result in results:
            if "error" in result:
                continue
            click.echo(result["image"])
            for rank, guess in enumerate(result["top"], 1):
                click.echo(f"  {rank}. {guess['class']:<24} {100 * guess['probability']:6.2f}%")
    for result in failed:
        click.echo(f"Error: cannot read {result['image']}: {result['error']}", err=True)
    if failed:
        ctx.exit(1)


# ------------------------------------------------------------------------------ info
@cli.command(epilog=examples("nbalex info --model alexnet",
                             "nbalex info --model alexnet-mini --classes 10",
                             "nbalex info --model alexnet-mini --batch-size 32 --json"))
@click.option("--model", required=True, help="alexnet, alexnet-mini or a config .toml.")
@click.option("--classes", type=click.IntRange(1), help="Size the output layer for this many "
              "classes, as training does for its data (the layer must say outputs = "
              "\"classes\").")
@click.option("--batch-size", type=click.IntRange(1),
              help="Also report the device arena needed for this batch size.")
@click.option("--backend", type=click.Choice(["cuda", "cpu", "reference"]), default="cuda",
              show_default=True, help="Whose buffers the arena size counts (with --batch-size).")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(model, classes, batch_size, backend, as_json):
    """The layer table of a network: output shapes, parameters and multiply-adds."""
    from nbalex.config import follows_data, sized_to
    from nbalex.model import describe
    if classes is not None:
        if not follows_data(model):
            raise click.UsageError(f"--classes {classes}: the last layer of {model} states its "
                                   f"output count; write outputs = \"classes\" there to let "
                                   f"it follow the data")
        model = sized_to(model, classes)
    description = describe(model, batch_size=batch_size, backend=backend)
    if as_json:
        click.echo(json.dumps(description, default=_jsonable))
        return
    click.echo(_layer_table(description))


def _jsonable(value):
    """json.dumps fallback for NumPy scalars, arrays and tuples of them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _layer_table(description):
    """The text table of :func:`nbalex.model.describe`'s result."""
    rows = [("layer", "type", "output", "params", "MACs/image")]
    for layer in description["layers"]:
        shape = layer.get("output_shape", layer.get("shape", ()))
        rows.append((str(layer["name"]), str(layer["type"]),
                     "×".join(str(d) for d in shape),
                     f"{int(layer.get('params', 0)):,}", f"{int(layer.get('macs', 0)):,}"))
    rows.append(("total", "", "", f"{int(description['params']):,}",
                 f"{int(description['macs']):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    lines.append(f"image size {description['image_size']}, input crop "
                 f"{description['input_size']}")
    if description.get("arena_bytes"):
        lines.append(f"arena for batch {description.get('batch_size')}: "
                     f"{description['arena_bytes']:,} bytes "
                     f"({description['arena_bytes'] / 2**20:.1f} MiB) per tower")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
