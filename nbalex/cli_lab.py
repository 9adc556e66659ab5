"""``nbalex lab``: the teaching labs' commands (list, start, check); the labs themselves are
:mod:`nbalex.labs`, imported inside the commands so ``nbalex --help`` stays instant."""

import json

import click

from nbalex.cli_common import FiniteFloat, NbalexGroup, OneLineUsageError, examples, one_line


@click.group(cls=NbalexGroup, epilog=examples("nbalex lab list", "nbalex lab start relu lab1",
                                             "nbalex lab check relu lab1/relu.py"))
def lab():
    """GPU teaching labs: write a layer's kernels, graded against the reference."""


@lab.command("list")
def lab_list():
    """The exercises in order, one line each: name, op, what it teaches."""
    from nbalex.labs.registry import LABS
    width = max(len(x.name) for x in LABS)
    for x in LABS:
        click.echo(f"{x.name:<{width}}  {x.op:<13} {x.teaches}")


@lab.command("start", epilog=examples("nbalex lab start relu lab1"))
@click.argument("name")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace a handout or starter already in FOLDER.")
def lab_start(name, folder, force):
    """Write NAME's handout (NAME.md) and starter module (NAME.py) into FOLDER."""
    from nbalex.labs.handout import start
    for path in start(name, folder, force=force):
        click.echo(path)


@lab.command("check", epilog=examples("nbalex lab check relu lab1/relu.py",
                                       "nbalex lab check relu lab1/relu.py --json",
                                       "nbalex lab check relu lab1/relu.py --static",
                                       "nbalex lab check relu lab1/relu.py --no-gpu-shapes",
                                       note="Exit status 0 when every case passes, 1 "
                                            "otherwise. On a GPU the lab also runs at "
                                            "AlexNet's shapes, timed beside the package's "
                                            "kernel and PyTorch's (timing is not graded)."))
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--backend", type=click.Choice(["cuda", "cpu", "reference"]), default="cuda",
              show_default=True, help="cuda: the GPU, or the simulator when there is none.")
@click.option("--timeout", type=FiniteFloat(0, min_open=True), default=60.0,
              show_default=True, help="Seconds one case may take before it counts as hung.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (score, cases).")
@click.option("--static", "static", is_flag=True,
              help="Also compile FILE's kernels for sm_90 (needs the CUDA tools, nbalex[static]) "
                   "and show registers, shared memory and spills beside the package's.")
@click.option("--no-gpu-shapes", "no_gpu_shapes", is_flag=True,
              help="Skip the GPU leg (AlexNet's shapes, checked and timed) on a GPU.")
@click.option("--gpu-shapes-scale", "gpu_shapes_scale",
              type=FiniteFloat(0, 1, min_open=True), hidden=True,
              help="Run the GPU leg at AlexNet's shapes times this, under the simulator too.")
@click.pass_context
def lab_check(ctx, name, file, backend, timeout, as_json, static, no_gpu_shapes,
              gpu_shapes_scale):
    """Grade FILE's launchers for lab NAME against the reference at small, awkward shapes
    (and, on a GPU, at AlexNet's)."""
    from nbalex.labs.grader import check, format_report
    try:
        report = check(name, file, backend=backend, timeout=timeout,
                       gpu_shapes=not no_gpu_shapes, scale=gpu_shapes_scale)
    except ValueError as exc:               # an unknown lab or not a .py file: exit 2, not 1
        raise OneLineUsageError(one_line(exc)) from None
    text = None if as_json else format_report(report)
    if static:                              # shown, never graded: the exit status is the grade's
        from nbalex.labs.static_report import format_static, static_report
        report["static"] = static_report(name, file)
        text = text and text + "\n" + format_static(report["static"])
    click.echo(json.dumps(report, indent=1) if as_json else text)
    ctx.exit(0 if report["passed"] else 1)
