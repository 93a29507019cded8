"""``deeplab crf``: dense CRF tools (``deeplab crf tune``: grid search of the CRF parameters)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from deeplab_cli.commands.options import (
    DatasetChoice,
    crf_backend_option,
    dataset_options,
    device_option,
    resize_option,
    scales_options,
)


@click.group("crf")
def crf() -> None:
    """Dense CRF tools: tune its parameters on a labelled split (use them with --crf-params)."""


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    from deeplab_cli.tuning import parse_numbers

    try:
        return parse_numbers(text)
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None


@crf.command("tune")
@dataset_options
@click.option(
    "--n", "count", type=click.IntRange(min=1), default=100, show_default=True, help="Images to tune on."
)
@click.option(
    "--iterations", type=click.IntRange(min=1), default=10, show_default=True, help="Mean-field iterations."
)
@click.option(
    "--grid",
    "grid_text",
    default=None,
    help="Coarse grid, e.g. 'bi_w=3,5;bi_xy_std=30,60,90,120;bi_rgb_std=3,5' (the default).",
)
@click.option(
    "--fine/--no-fine", default=True, show_default=True, help="Refine around the best coarse point."
)
@click.option(
    "--unary-scales",
    default="0.6,0.8,1,1.25",
    show_default=True,
    help="Unary scales tried at the best point.",
)
@scales_options
@crf_backend_option
@click.option(
    "--workers",
    "--crf-workers",
    "workers",
    type=click.IntRange(min=0),
    default=None,
    help="CRF worker processes (0 = in this process) [default: one per core].",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the best parameters (default: <cache>/crf/<model>.json).",
)
@resize_option
@device_option
@click.option("--quiet", "-q", is_flag=True, help="No progress messages.")
@click.pass_context
def tune(
    ctx: click.Context,
    data: DatasetChoice,
    count: int,
    iterations: int,
    grid_text: str | None,
    fine: bool,
    unary_scales: str,
    scales: tuple[float, ...],
    flip: bool,
    crf_backend: str,
    workers: int | None,
    output: Path | None,
    resize: str | int,
    device: str,
    quiet: bool,
) -> None:
    """Grid-search the CRF's appearance kernel and unary scale on N images of a split.

    The smoothness kernel stays at pos_w = 3, pos_xy_std = 3 as in the DeepLab papers. The network runs
    once per image (probabilities cached on disk); candidates run in CRF worker processes. The grid and
    the output path are checked before the network runs; the best parameters are printed, and written to
    --output for `deeplab eval --crf --crf-params FILE` and `deeplab segment --crf --crf-params FILE`.

    \b
    Example:
      deeplab crf tune --dataset voc --split val --n 100 --data-root ~/data

    Exit status: 0 done, 1 failed (the best parameters are still printed if only saving failed),
    2 usage error, 130 interrupted.
    """
    from deeplab_cli.crf.params import CRFParams
    from deeplab_cli.crf.runner import CRFRunner, set_notices
    from deeplab_cli.errors import DeeplabError
    from deeplab_cli.evaluate import check_writable
    from deeplab_cli.runtime import Segmenter
    from deeplab_cli.tuning import (
        COARSE_GRID,
        FINE_STEPS,
        check_search,
        default_output,
        parse_grid,
        save_result,
    )
    from deeplab_cli.tuning import tune as run_tune

    coarse = parse_grid(grid_text) if grid_text else COARSE_GRID
    steps = FINE_STEPS if fine else {}
    unary = _parse_floats(unary_scales, "--unary-scales")
    check_search(coarse, steps, unary, iterations)
    model = data.model_name()
    target = output or default_output(model)
    check_writable(target)
    # the search runs after the network pass, so it may use every core (one thread per worker)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    set_notices(not quiet)
    runner = CRFRunner(CRFParams(), crf_backend, device, workers, threads=1)
    with runner:
        dataset = data.open(count)
        segmenter = Segmenter(model, device=device, resize=resize)
        log = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
        log(f"deeplab: CRF on {runner.describe()}")
        result = run_tune(
            segmenter,
            dataset,
            iterations=iterations,
            coarse=coarse,
            fine_steps=steps,
            unary_scales=unary,
            scales=scales,
            flip=flip,
            crf=runner,
            log=log,
        )
    best = result.best.params
    click.echo(
        f"{segmenter.spec.name} on {data.dataset} {data.split}: {result.images} images, "
        f"{len(result.candidates)} candidates"
    )
    click.echo(
        "best CRF: "
        + ", ".join(f"{k}={best[k]:g}" for k in ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std"))
        + f", unary_scale={best['unary_scale']:g}, iterations={best['iterations']}"
    )
    click.echo(f"mIoU with CRF: {100 * result.best.miou:.2f}   without CRF: {100 * result.baseline_miou:.2f}")
    if not result.crf_helps:
        click.echo(
            "The CRF does not improve mIoU on these images with any parameters tried: "
            "evaluate and segment without --crf for this model."
        )
    try:
        save_result(target, result)
    except (OSError, DeeplabError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        click.echo(
            f"deeplab: error: cannot write {target}: {reason} (the best parameters are above)", err=True
        )
        ctx.exit(1)
    click.echo(f"parameters written to {target}")
