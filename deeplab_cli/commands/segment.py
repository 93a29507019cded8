"""``deeplab segment``: images, folders and lists on stdin to label masks, overlays and score maps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from deeplab_cli.errors import UsageError

DEFAULT_OUT = "deeplab-out"


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM stop a run like Ctrl-C does: in-flight writes finish or are removed, none is partial."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread (e.g. called from a test runner thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _crf_params(spec: Any, params_file: Path | None, overrides: dict[str, Any]) -> Any:
    """The model's CRF defaults, then a parameter file (e.g. from `deeplab crf tune`), then the options."""
    from deeplab_cli.tuning import resolve_crf_params

    try:
        return resolve_crf_params(spec, params_file, overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
@click.option("-m", "--model", default=None, help="Registry name or .onnx file [default: the default model].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
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
@click.option("--skip-existing", is_flag=True, help="Skip inputs whose outputs all exist already.")
@click.option(
    "--shard", default=None, metavar="i/n", help="Process the inputs at positions i, i+n, ... only."
)
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
@click.option(
    "--crf", "use_crf", is_flag=True, help="Refine with the dense CRF (parameters default to the model's)."
)
@click.option(
    "--crf-backend", type=click.Choice(["auto", "torch", "pydensecrf"]), default="auto", show_default=True
)
@click.option(
    "--crf-params",
    "crf_params_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CRF parameters from a JSON file (e.g. written by `deeplab crf tune`).",
)
@click.option("--crf-iterations", type=int, default=None, help="Mean-field iterations.")
@click.option("--crf-bi-w", type=float, default=None, help="Appearance kernel weight.")
@click.option("--crf-bi-xy-std", type=float, default=None, help="Appearance kernel spatial std (pixels).")
@click.option("--crf-bi-rgb-std", type=float, default=None, help="Appearance kernel colour std.")
@click.option("--crf-pos-w", type=float, default=None, help="Smoothness kernel weight.")
@click.option("--crf-pos-xy-std", type=float, default=None, help="Smoothness kernel spatial std (pixels).")
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
    max_size: int,
    workers: int,
    sessions: int,
    use_crf: bool,
    crf_backend: str,
    crf_params_file: Path | None,
    crf_iterations: int | None,
    crf_bi_w: float | None,
    crf_bi_xy_std: float | None,
    crf_bi_rgb_std: float | None,
    crf_pos_w: float | None,
    crf_pos_xy_std: float | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Segment images into label masks (palette PNGs whose values are class indices).

    INPUT is an image file, a folder (searched recursively; images found by content), a glob pattern,
    or '-' for a list of paths on stdin, one per line. Outputs mirror the input folders under OUT.

    \b
    Examples:
      deeplab segment photo.jpg -o out/                 # out/photo.png
      deeplab segment photos/ -o masks/ --overlay --json
      find photos -name '*.jpg' | deeplab segment - -o masks/ --skip-existing
      deeplab segment photo.jpg -o - > mask.png
      deeplab segment 'data/**/*.png' -o out/ --shard 0/4   # one job of a 4-way array

    Exit status: 0 all done, 1 some inputs failed (one line each on stderr), 2 usage error.
    """
    from deeplab_cli import pipeline
    from deeplab_cli.device import parse_device
    from deeplab_cli.runtime import Segmenter
    from deeplab_cli.zoo import get_model

    shard_spec = pipeline.parse_shard(shard)
    parse_device(device)
    to_stdout = output == "-"
    if to_stdout and (as_json or overlay or scores or not mask):
        raise UsageError(
            "-o - writes only the mask PNG to stdout: it cannot be combined with --json, --overlay, "
            "--scores or --no-mask"
        )
    spec = None if model and model.lower().endswith(".onnx") else get_model(model)
    out_dir = None if to_stdout else Path(output)
    items = pipeline.expand_inputs(inputs, stdin=sys.stdin, exclude=[out_dir] if out_dir else [])
    if to_stdout and len(items) > 1:
        raise UsageError(f"-o - needs exactly one input image, got {len(items)}")
    options = pipeline.SegmentOptions(
        out_dir=out_dir,
        mask=mask and not to_stdout,
        overlay=overlay,
        overlay_alpha=overlay_alpha,
        scores=scores,
        skip_existing=skip_existing,
        batch_size=batch_size,
        workers=workers,
        crf_backend=crf_backend,
        crf_device=str(parse_device(device)) if parse_device(device).wants_cuda else "cpu",
        stdout_stream=click.get_binary_stream("stdout") if to_stdout else None,
    )
    if not options.kinds and not to_stdout and not as_json:
        raise UsageError("nothing to do: --no-mask without --overlay, --scores or --json")
    if not items:
        raise UsageError("no input images found")
    jobs = pipeline.select_shard(
        pipeline.plan_outputs(items, out_dir or Path("."), options.kinds), shard_spec
    )
    if out_dir is not None and options.kinds:
        pipeline.check_output_dir(out_dir)

    if not sessions:
        sessions = 1 if parse_device(device).wants_cuda else min(2, os.cpu_count() or 1)
    segmenter = Segmenter(
        spec or model, device=device, batch_size=batch_size, max_size=max_size or None, sessions=sessions
    )
    if use_crf:
        options.crf = _crf_params(
            segmenter.spec,
            crf_params_file,
            {
                "iterations": crf_iterations,
                "bi_w": crf_bi_w,
                "bi_xy_std": crf_bi_xy_std,
                "bi_rgb_std": crf_bi_rgb_std,
                "pos_w": crf_pos_w,
                "pos_xy_std": crf_pos_xy_std,
            },
        )
    if verbose and not quiet:
        click.echo(
            f"deeplab: {segmenter.spec.name} on {', '.join(segmenter.providers)}; {len(jobs)} inputs",
            err=True,
        )

    say = _Stderr()

    def on_record(record: pipeline.Record) -> None:
        if record.status == "failed":
            say(f"deeplab: error: {record.error}")
        elif verbose and not quiet:
            target = ", ".join(record.outputs.values()) or "-"
            say(f"deeplab: {record.status}: {record.input} -> {target}")
        if as_json:
            click.echo(json.dumps(record.to_dict()))
            sys.stdout.flush()

    runner = pipeline.Pipeline(segmenter, options, on_record=on_record)
    with _sigterm_as_interrupt():
        summary = _run_with_progress(runner, jobs, say, show=not quiet and sys.stderr.isatty())
    if not quiet:
        rate = summary.ok / summary.elapsed if summary.elapsed > 0 else 0.0
        click.echo(
            f"deeplab: {summary.total} inputs: {summary.ok} done, {summary.skipped} skipped, "
            f"{summary.failed} failed in {summary.elapsed:.1f} s ({rate:.2f} images/s)",
            err=True,
        )
    if summary.failed:
        ctx.exit(1)


class _Stderr:
    """Lines for stderr; printed above the progress bar while one is shown."""

    def __init__(self) -> None:
        self.console: Any = None

    def __call__(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(line, err=True)


def _run_with_progress(runner: Any, jobs: list, say: _Stderr, show: bool) -> Any:
    if not show:
        return runner.run(jobs)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("segment"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("segment", total=len(jobs))
        runner.on_progress = lambda n: progress.advance(task, n)
        say.console = progress.console
        try:
            return runner.run(jobs)
        finally:
            say.console = None
