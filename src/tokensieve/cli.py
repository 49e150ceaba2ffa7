"""The ``tokensieve`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tokensieve.core.registry import get_method, list_methods

app = typer.Typer(help="Training-free visual token reduction for vision-language models.",
                  no_args_is_help=True, add_completion=False)


@app.command("list")
def list_command() -> None:
    """Print every method: where it acts, the signals it needs and its paper."""
    table = Table(title="tokensieve methods")
    for col in ("name", "acts", "kind", "signals needed", "optional", "paper"):
        table.add_column(col, overflow="fold")
    for name in list_methods():
        spec = get_method(name)
        table.add_row(spec.name, spec.stage, spec.kind, ", ".join(spec.signals) or "-",
                      ", ".join(spec.optional_signals) or "-", spec.paper)
    Console(width=200).print(table)


def _split(values: list[str] | None) -> list[str] | None:
    """``--methods a,b --methods c`` -> ``[a, b, c]``."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _keeps(values: list[str] | None) -> tuple[int, ...] | None:
    items = _split(values)
    if items is None:
        return None
    out = []
    for v in items:
        try:
            out.append(int(v))
        except ValueError:
            raise ValueError(f"--keep {v!r}: expected an int count of visual tokens") from None
    return tuple(out)


def _fail(console: Console, err: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {err}", highlight=False)
    return typer.Exit(code=2)


@app.command("bench")
def bench_command(
    model: Annotated[str | None, typer.Option(
        help="model path or hub id (default: the embedded tiny VLM; 'random-tiny': an "
             "untrained smoke-test LLaVA)")] = None,
    methods: Annotated[list[str] | None, typer.Option(
        help="methods, comma-separated or repeated (default: a representative set)")] = None,
    keep: Annotated[list[str] | None, typer.Option(
        help="budgets in visual tokens, comma-separated (default: 192,128,64 of 576, "
             "scaled to the model)")] = None,
    limit: Annotated[int, typer.Option(help="test samples")] = 280,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("bench-results"),
    batch_size: Annotated[int, typer.Option(help="samples per generate call")] = 16,
    seed: Annotated[int, typer.Option(help="seed of randomised methods")] = 0,
    repeats: Annotated[int, typer.Option(help="timed repeats (medians reported)")] = 3,
    answer_tokens: Annotated[int | None, typer.Option(
        help="greedy tokens per answer (default: 1 for the embedded VLM, whose answers are "
             "single tokens; 4 otherwise)")] = None,
) -> None:
    """Accuracy, FLOPs, latency and memory of methods x budgets; JSON, CSV and a Pareto plot.

    With no arguments: the embedded tiny VLM, 280 scene-QA test samples, 6 methods (random,
    pool, fastervlm, visionzip, divprune, cdpruner) at 192/128/64 of 576 tokens, sized to
    finish within about 5 minutes on 2 CPU cores.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokensieve.bench.protocol import BenchConfig, prepare, run

    console = Console(width=120)
    try:
        config = BenchConfig(model=model, methods=tuple(_split(methods)) if methods else None,
                             keeps=_keeps(keep), limit=limit, device=device, dtype=dtype,
                             seed=seed, batch_size=batch_size, timing_repeats=repeats,
                             answer_tokens=answer_tokens, out=str(out))
        with console.status("checking the settings and loading the model..."):
            prepared = prepare(config)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(console, err) from None
    name = model or "embedded tiny VLM"
    console.print(f"[bold]tokensieve bench[/]: {name} ({prepared.dims.image_tokens} visual "
                  f"tokens), {limit} samples of the scene-QA {config.split} split, "
                  f"{prepared.device} {config.dtype}, seed {seed}")
    console.print(f"methods: {', '.join(prepared.methods) or '(none)'}; keep: "
                  f"{', '.join(map(str, prepared.keeps))}; {len(prepared.cells)} runs "
                  "(the full model first)")
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting", total=len(prepared.cells))
        started = [False]

        def step(label: str) -> None:
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=label)

        try:
            result = run(prepared, progress=step)
        except (ValueError, FileNotFoundError) as err:
            raise _fail(console, err) from None
        progress.advance(task)
        progress.update(task, description="done")
    _print_results(console, result)
    for kind, path in result.files.items():
        console.print(f"wrote {kind}: {path}")


def _print_results(console: Console, result) -> None:
    table = Table(title="accuracy / cost (medians; MACs = multiply-adds, FastV's 'FLOPs')")
    for col in ("method", "keep", "accuracy", "retention", "prefill GMACs", "KV MiB",
                "prefill ms", "decode ms/tok", "tok/s", "peak MiB (+added)"):
        table.add_column(col, justify="right" if col not in ("method",) else "left")
    for r in result.rows:
        if r.error:
            table.add_row(r.method, str(r.keep), "[red]failed[/]", r.error[:40], *[""] * 6)
            continue
        ret = r.retention.get("overall")
        table.add_row(
            r.method, str(r.keep), f"{100 * r.accuracy['overall']:.1f}%",
            "-" if ret is None or ret != ret else f"{100 * ret:.1f}%",
            f"{r.cost['prefill_macs'] / 1e9:.3f}", f"{r.cost['kv_cache_bytes'] / 2**20:.2f}",
            f"{1e3 * r.timing['prefill_s']:.1f}", f"{1e3 * r.timing['decode_s_per_token']:.2f}",
            f"{r.timing['tokens_per_s']:.0f}", f"{r.timing['peak_memory_bytes'] / 2**20:.0f} "
            f"(+{r.timing['peak_memory_delta_bytes'] / 2**20:.1f})")
    console.print(table)


@app.command("viz")
def viz_command(
    image: Annotated[Path, typer.Argument(help="an image file")],
    method: Annotated[str, typer.Option(help="a method name (tokensieve list)")],
    keep: Annotated[float, typer.Option(help="visual tokens to keep (count, or fraction < 1)")],
    question: Annotated[str, typer.Option(help="the prompt's question")] = (
        "what color is the circle ?"),
    out: Annotated[Path | None, typer.Option(help="output PNG (default: IMAGE-METHOD-K.png)")
                   ] = None,
    model: Annotated[str | None, typer.Option(
        help="model path or hub id (default: the embedded tiny VLM)")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Draw which visual tokens a method keeps (white outline), merges (tinted, outlined per
    group) and drops (dark) on the image as the model sees it."""
    from tokensieve.bench.protocol import check_output_dir, load_model, parse_device, parse_dtype
    from tokensieve.bench.viz import load_image, visualize

    console = Console(width=120)
    try:
        img = load_image(image)
        spec = get_method(method)
        k: int | float = int(keep) if float(keep).is_integer() and keep >= 1 else keep
        if isinstance(k, float) and not 0.0 < k < 1.0:
            raise ValueError(f"--keep {keep}: expected a count >= 1 or a fraction in (0, 1)")
        target = out or image.with_name(f"{image.stem}-{spec.name}-{keep:g}.png")
        if target.suffix.lower() != ".png":
            raise ValueError(f"--out {str(target)!r}: expected a .png path")
        check_output_dir(target.parent if str(target.parent) else Path("."))
        dev, dt = parse_device(device), parse_dtype(dtype)
        with console.status("loading the model..."):
            vlm, processor = load_model(model, dev, dt)
        info = visualize(vlm, processor, img, spec.name, k, target, question=question)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(console, err) from None
    console.print(f"{spec.name} keep={keep:g}: {info['tokens']} tokens "
                  f"({info['kept']} kept, {info['merged_groups']} merged groups); "
                  f"answer: {info['answer']!r}")
    console.print(f"wrote {info['path']}")


@app.callback()
def main() -> None:
    """tokensieve: prune, merge and cluster visual tokens of VLMs, measured under one protocol."""


if __name__ == "__main__":
    app()
