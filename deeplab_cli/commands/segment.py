"""``deeplab segment``: images, folders and lists on stdin to label masks, overlays and score maps.

The command parses, makes one call (:func:`deeplab_cli.batch.segment_files`) and prints.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from deeplab_cli.commands.options import CRFChoice, crf_options, device_option, model_option, resize_option
from deeplab_cli.commands.progress import ProgressBar
from deeplab_cli.errors import StdoutClosed, UsageError

if TYPE_CHECKING:
    from deeplab_cli.batch import Record
    from deeplab_cli.crf.runner import CRFRunner
    from deeplab_cli.runtime import Segmenter

DEFAULT_OUT = "deeplab-out"


@click.command("segment")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "-o",
    "--output",
    "output",
    default=DEFAULT_OUT,
    show_default=True,
    metavar="OUT",
    help="Output folder (input folders are mirrored under it); '-' writes the one mask PNG to stdout.",
)
@model_option
@device_option
@click.option("-b", "--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--mask/--no-mask", default=True, show_default=True, help="Write the label mask PNG.")
@click.option("--overlay", is_flag=True, help="Also write the colour overlay on the image (.overlay.jpg).")
@click.option("--overlay-alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option(
    "--scores",
    type=click.Choice(["logits", "probs"]),
    default=None,
    help="Also write raw scores: logits at network resolution (.logits.npy, float16, C x h x w) or "
    "probabilities at image resolution (.probs.npz, key 'probs', float16, C x H x W).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per input on stdout.")
@click.option(
    "--skip-existing",
    is_flag=True,
    help="Skip inputs whose outputs all exist already (reported with what the earlier run recorded).",
)
@click.option(
    "--shard", default=None, metavar="i/n", help="Process the inputs at positions i, i+n, ... only."
)
@click.option("-0", "--null", is_flag=True, help="The list read from '-' is NUL-separated (find -print0).")
@resize_option
@click.option(
    "--max-size",
    default=2048,
    show_default=True,
    type=click.IntRange(min=0),
    help="Shrink images whose longer side exceeds this for the network (outputs stay full size); 0 = never.",
)
@click.option(
    "--workers", default=0, type=click.IntRange(min=0), help="Reader/writer threads [default: min(4, cores)]."
)
@click.option(
    "--sessions",
    default=0,
    type=click.IntRange(min=0),
    help="Images inferred at once, each in its own ONNX Runtime session sharing the cores "
    "[default: 2 on a CPU with 2+ cores, 1 on CUDA].",
)
@crf_options
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: Ray Data (the [ray] extra), on --ray-address or a local Ray.",
)
@click.option(
    "--ray-address", default=None, help="Ray cluster to join (auto: the one `ray start` runs here)."
)
@click.option(
    "--concurrency", default=0, type=click.IntRange(min=0), help="Ray inference actors [default: auto]."
)
@click.option(
    "--gpus-per-worker", default=0.0, type=click.FloatRange(min=0), help="GPUs per Ray inference actor."
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and --json lines).")
@click.option("-v", "--verbose", is_flag=True, help="Print one line per input on stderr.")
@click.pass_context
def segment(
    ctx: click.Context,
    inputs: tuple[str, ...],
    output: str,
    model: str | None,
    device: str,
    batch_size: int,
    mask: bool,
    overlay: bool,
    overlay_alpha: float,
    scores: str | None,
    as_json: bool,
    skip_existing: bool,
    shard: str | None,
    null: bool,
    resize: str | int,
    max_size: int,
    workers: int,
    sessions: int,
    crf: CRFChoice,
    engine: str,
    ray_address: str | None,
    concurrency: int,
    gpus_per_worker: float,
    quiet: bool,
    verbose: bool,
) -> None:
    """Segment images into label masks (palette PNGs whose values are class indices).

    INPUT is an image file, a folder (searched recursively; images found by content), a glob pattern,
    or '-' for a list of paths on stdin (one per line; NUL-separated with -0). Outputs mirror the input
    folders under OUT; OUT is marked as ours (.deeplab-output), and our own outputs found in a marked
    folder are never taken as inputs. An output never replaces an input.

    \b
    Examples:
      deeplab segment photo.jpg -o out/                 # out/photo.png
      deeplab segment photos/ -o masks/ --overlay --json
      find photos -name '*.jpg' -print0 | deeplab segment - -0 -o masks/ --skip-existing
      deeplab segment photo.jpg -o - > mask.png
      deeplab segment 'data/**/*.png' -o out/ --shard 0/4   # one job of a 4-way array

    \b
    Exit status: 0 all done, 1 some inputs failed (one line each on stderr), 2 usage error,
    130 interrupted (Ctrl-C or SIGTERM; outputs written so far are complete and reported).
    """
    from deeplab_cli.batch import SegmentOptions, parse_shard, segment_files

    if engine == "ray":  # same options, records and exit codes; the driver only plans (CPU, no CRF pool)
        from deeplab_cli.ray import command_engine

        segment_files, device, sessions, crf = command_engine(
            output, device, crf, ray_address, concurrency, gpus_per_worker
        )
    to_stdout = output == "-"
    if to_stdout and (as_json or overlay or scores or not mask):
        raise UsageError(
            "-o - writes only the mask PNG to stdout: it cannot be combined with --json, --overlay, "
            "--scores or --no-mask"
        )
    options = SegmentOptions(
        mask=mask,
        overlay=overlay,
        overlay_alpha=overlay_alpha,
        scores=scores,
        skip_existing=skip_existing,
        shard=parse_shard(shard),
        batch_size=batch_size,
        workers=workers,
        null=null,
        stdin=sys.stdin,
        stdout_stream=sys.stdout.buffer if to_stdout else None,
    )
    if not options.kinds and not as_json:
        raise UsageError("nothing to do: --no-mask without --overlay, --scores or --json")
    if quiet:
        from deeplab_cli import weights
        from deeplab_cli.crf.runner import set_notices

        weights.set_notice(None)  # a first use still converts, silently
        set_notices(False)  # and compiles the CRF silently
    segmenter = _segmenter(model, device, batch_size, resize, max_size, sessions)
    runner = _crf_runner(crf, segmenter, device)
    with ProgressBar("segment", quiet=quiet) as bar:

        def on_start(count: int) -> None:
            if verbose and not quiet:
                bar.say(f"deeplab: {segmenter.spec.name} on {', '.join(segmenter.providers)}; {count} inputs")
            bar.start(count)

        def on_record(record: Record) -> None:
            _report(record, bar, as_json, verbose and not quiet)
            bar.advance()

        try:
            summary = segment_files(
                list(inputs),
                None if to_stdout else Path(output),
                options,
                segmenter,
                crf=runner,
                on_record=on_record,
                on_notice=None if quiet else lambda line: bar.say(f"deeplab: {line}"),
                on_start=on_start,
            )
        finally:
            if runner is not None:
                runner.close(cancel=True)
    if not quiet:
        click.echo(f"deeplab: {summary.line()}", err=True)
    ctx.exit(summary.exit_code)


def _segmenter(
    model: str | None, device: str, batch_size: int, resize: str | int, max_size: int, sessions: int
) -> Segmenter:
    """The model, resolved (a registry name is checked before anything is converted or read)."""
    from deeplab_cli.device import parse_device
    from deeplab_cli.runtime import Segmenter
    from deeplab_cli.zoo import get_model

    spec = None if model and model.lower().endswith(".onnx") else get_model(model)
    if not sessions:
        sessions = 1 if parse_device(device).wants_cuda else min(2, os.cpu_count() or 1)
    return Segmenter(
        spec or model,
        device=device,
        batch_size=batch_size,
        resize=resize,
        max_size=max_size or None,
        sessions=sessions,
    )


def _crf_runner(crf: CRFChoice, segmenter: Segmenter, device: str) -> CRFRunner | None:
    """The CRF runner for ``--crf`` (its backend checked now, before any image is read), else None."""
    from deeplab_cli.commands.options import resolve_crf
    from deeplab_cli.device import parse_device

    params, backend, workers = resolve_crf(crf, segmenter.spec.crf)
    if params is None:
        return None
    from deeplab_cli.crf.runner import CRFRunner

    on_gpu = parse_device(device).wants_cuda
    return CRFRunner(params, backend=backend, device=device, workers=workers, network_on_gpu=on_gpu)


def _report(record: Record, bar: ProgressBar, as_json: bool, verbose: bool) -> None:
    """One record: an error line on stderr, a verbose line, and the JSON line on stdout."""
    data = record.to_dict()
    if record.status == "failed":
        bar.say(f"deeplab: error: {data['error']}")
    elif verbose:
        target = ", ".join(data.get("outputs", {}).values()) or "-"
        bar.say(f"deeplab: {record.status}: {data['input']} -> {target}")
    if as_json:
        try:
            click.echo(json.dumps(data))
            sys.stdout.flush()
        except BrokenPipeError:
            raise StdoutClosed("stdout closed") from None
