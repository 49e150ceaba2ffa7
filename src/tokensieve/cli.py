"""The ``tokensieve`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tokensieve.core.registry import get_method, list_methods

app = typer.Typer(help="Training-free visual token reduction for vision-language models.",
                  no_args_is_help=True, add_completion=False)


@app.command("list")
def list_command() -> None:
    """Print every method: where it acts, whether `ts.apply`, `tokensieve bench` and
    `tokensieve viz` run it, the signals it needs and its paper."""
    from tokensieve.bench.protocol import method_runs

    table = Table(title="tokensieve methods (every method runs on token sets with ts.reduce)")
    for col in ("name", "acts", "kind", "apply", "bench", "viz", "signals needed", "optional",
                "paper"):
        table.add_column(col, overflow="fold")
    for name in list_methods():
        spec = get_method(name)
        runs = method_runs(name)
        table.add_row(spec.name, spec.stage, spec.kind,
                      *("yes" if runs[k] else "-" for k in ("apply", "bench", "viz")),
                      ", ".join(spec.signals) or "-", ", ".join(spec.optional_signals) or "-",
                      spec.paper)
    Console(width=220).print(table)
    def names(stage: str, key: str, value: bool) -> str:
        return ", ".join(m for m in list_methods() if method_runs(m)[key] is value
                         and (not stage or get_method(m).stage == stage)) or "none"

    Console(width=120).print(
        "acts: encoder = inside the vision tower, pre-llm = on the tokens given to the LLM, "
        "llm = inside the LLM. apply: `ts.apply` patches the pre-LLM methods, the in-LLM "
        f"ones with a layer schedule ({names('llm', 'apply', True)}) and the in-encoder "
        f"ones ({names('encoder', 'apply', True)}: their own options, or keep); bench: "
        "pre-LLM and in-LLM methods and the in-encoder ones whose keep maps to their options "
        f"({names('encoder', 'bench', True)}; its grid sets keep); ts.reduce only: "
        f"{names('', 'apply', False)}. Video methods (signals include frames) reduce the "
        "videos of OneVision / Qwen2-VL inputs and run in `bench --task video`. viz: the "
        "methods bench runs, but the video ones.", highlight=False)


def _split(values: list[str] | None) -> list[str] | None:
    """``--methods a,b --methods c`` -> ``[a, b, c]``."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _keeps(values: list[str] | None) -> tuple[int | float, ...] | None:
    """``--keep 192,0.25``: ints are counts, decimals fractions in (0, 1] of each image's
    tokens (as in ``ts.apply``)."""
    from tokensieve.bench.protocol import check_keep_values

    items = _split(values)
    if items is None:
        return None
    out: list[int | float] = []
    for v in items:
        try:
            k: int | float = int(v)
        except ValueError:
            try:
                k = float(v)
            except ValueError:
                raise ValueError(f"--keep {v!r}: expected an int count of visual tokens or a "
                                 "fraction in (0, 1] (e.g. 64 or 0.25)") from None
        try:
            check_keep_values([k])
        except ValueError as err:
            raise ValueError(f"--keep {v!r}: {err}") from None
        out.append(k)
    return tuple(out)


def _signal_layers(value: str | None) -> str | tuple[int | str, ...] | None:
    """``--signal-layers 9,feature`` -> ``(9, "feature")``; ``all`` stays ``"all"``."""
    if value is None:
        return None
    text = value.strip()
    if text == "all":
        return "all"
    out: list[int | str] = []
    for item in (v.strip() for v in text.split(",")):
        if item == "feature":
            out.append(item)
            continue
        try:
            out.append(int(item))
        except ValueError:
            raise ValueError(f"--signal-layers {value!r}: expected 'all' or comma-separated "
                             "encoder layer indices and 'feature' (e.g. 9,feature)") from None
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
        help="methods, comma-separated or repeated; 'all': every method the model can run "
             "(default: a representative set)")] = None,
    keep: Annotated[list[str] | None, typer.Option(
        help="budgets, comma-separated: ints count visual tokens, decimals are fractions of "
             "each image's tokens (0.25 = a quarter) (default: 192,128,64 of 576, scaled to "
             "the model)")] = None,
    signal_layers: Annotated[str | None, typer.Option(
        help="encoder layers whose attention pre-LLM methods read, passed to ts.apply: "
             "'all' or indices and 'feature', e.g. 9,feature (default: each method's "
             "official layers)")] = None,
    limit: Annotated[int, typer.Option(help="test samples")] = 280,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("bench-results"),
    batch_size: Annotated[int, typer.Option(help="samples per generate call")] = 16,
    seed: Annotated[int, typer.Option(help="seed of randomised methods")] = 0,
    repeats: Annotated[int, typer.Option(
        help="timed rounds, every run timed once per round in alternation (medians and "
             "IQR reported)")] = 9,
    answer_tokens: Annotated[int | None, typer.Option(
        help="greedy tokens per answer (default: 1 for the embedded VLM, whose answers are "
             "single tokens; 4 otherwise)")] = None,
    task: Annotated[str, typer.Option(
        help="'image': scene QA on the embedded tiny VLM (or --model); 'video': clip QA on "
             "8-frame videos with the embedded tiny video VLM (budgets: 0.5,0.25,0.125 of a "
             "clip's 1152 tokens; methods: the video ones, signals include frames)")] = "image",
) -> None:
    """Accuracy, FLOPs, latency and memory of methods x budgets; JSON, CSV and a Pareto plot.

    With no arguments: the embedded tiny VLM, 280 scene-QA test samples, 6 methods (random,
    pool, fastervlm, visionzip, divprune, cdpruner) at 192/128/64 of 576 tokens, 9 timed
    rounds: about 16 CPU-minutes (measured 31 min wall on 2 CPU cores shared with other jobs;
    less on an idle machine).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokensieve.bench.protocol import BenchConfig, prepare, run

    console = Console(width=120)
    try:
        config = BenchConfig(model=model, methods=tuple(_split(methods)) if methods else None,
                             keeps=_keeps(keep), signal_layers=_signal_layers(signal_layers),
                             limit=limit, device=device, dtype=dtype,
                             seed=seed, batch_size=batch_size, timing_repeats=repeats,
                             answer_tokens=answer_tokens, out=str(out), task=task)
        with console.status("checking the settings and loading the model..."):
            prepared = prepare(config)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(console, err) from None
    video = config.task == "video"
    name = model or ("embedded tiny video VLM" if video else "embedded tiny VLM")
    console.print(f"[bold]tokensieve bench[/]: {name} ({prepared.dims.image_tokens} visual "
                  f"tokens{' per clip' if video else ''}), {limit} samples of the "
                  f"{'clip' if video else 'scene'}-QA {config.split} split, "
                  f"{prepared.device} {config.dtype}, seed {seed}")
    console.print(f"methods: {', '.join(prepared.methods) or '(none)'}; keep: "
                  f"{', '.join(map(str, prepared.keeps))}; {len(prepared.cells)} runs "
                  "(the full model first), then all of them timed in alternation")
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting", total=len(prepared.cells) + 1)
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


def _print_results(console: Console, result: Any) -> None:
    """The results table; latencies as ``median ±IQR``, ``!`` and a warning below the table
    where the spread is large."""
    from tokensieve.bench.report import latency_cell
    from tokensieve.bench.timing import LARGE_SPREAD

    table = Table(title="accuracy / cost (latency: median ±IQR over interleaved repeats; "
                        "MACs = multiply-adds, FastV's 'FLOPs')")
    for col in ("method", "keep", "accuracy", "retention", "prefill GMACs", "KV MiB",
                "select ms", "prefill ms", "decode ms/tok", "tok/s", "peak MiB (+added)"):
        table.add_column(col, justify="right" if col not in ("method",) else "left")
    noisy = []
    for r in result.rows:
        if r.error:
            table.add_row(r.method, str(r.keep), "[red]failed[/]", r.error[:40], *[""] * 7)
            continue
        ret = r.retention.get("overall")
        t = r.timing
        if t.get("large_spread"):
            noisy.append(f"{r.method}@{r.keep} ({', '.join(t['large_spread'])})")
        table.add_row(
            r.method, str(r.keep), f"{100 * r.accuracy['overall']:.1f}%",
            "-" if ret is None or ret != ret else f"{100 * ret:.1f}%",
            f"{r.cost['prefill_macs'] / 1e9:.3f}", f"{r.cost['kv_cache_bytes'] / 2**20:.2f}",
            latency_cell(t, "selection_s", digits=2), latency_cell(t, "prefill_s"),
            latency_cell(t, "decode_s_per_token", digits=2), f"{t['tokens_per_s']:.0f}",
            f"{t['peak_memory_bytes'] / 2**20:.0f} (+{t['peak_memory_delta_bytes'] / 2**20:.1f})")
    console.print(table)
    if noisy:
        console.print(f"[yellow]warning:[/] large latency spread (IQR / median > "
                      f"{100 * LARGE_SPREAD:.0f} %, marked !) in {len(noisy)} row(s): "
                      f"{'; '.join(noisy)}. The machine was busy; compare those latencies "
                      "with care or rerun with more --repeats.", highlight=False)


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
    from tokensieve.bench.protocol import (
        check_model_name,
        check_output_dir,
        load_model,
        method_runs,
        parse_device,
        parse_dtype,
    )
    from tokensieve.bench.viz import is_scene_image, load_image, visualize

    console = Console(width=120)
    try:
        img = load_image(image)
        spec = get_method(method)
        if not method_runs(spec.name)["viz"]:
            what = "reduces video clips" if "frames" in spec.signals else \
                f"acts at stage {spec.stage!r}"
            raise ValueError(f"method {spec.name!r} {what}; viz draws pre-LLM and in-LLM "
                             "reductions of one image (`tokensieve list`, column viz)")
        k: int | float = int(keep) if float(keep).is_integer() and keep >= 1 else keep
        if isinstance(k, float) and not 0.0 < k < 1.0:
            raise ValueError(f"--keep {keep}: expected a count >= 1 or a fraction in (0, 1)")
        target = out or image.with_name(f"{image.stem}-{spec.name}-{keep:g}.png")
        if target.suffix.lower() != ".png":
            raise ValueError(f"--out {str(target)!r}: expected a .png path")
        check_output_dir(target.parent if str(target.parent) else Path("."))
        dev, dt = parse_device(device), parse_dtype(dtype)
        check_model_name(model)
        if model is None and not is_scene_image(img):
            console.print(f"[yellow]warning:[/] {str(image)!r} is not a scene of the embedded "
                          "generator: the embedded tiny VLM is a synthetic-scene model "
                          "(trained only on generated scenes), so the tokens it keeps and its "
                          "answer say little about a real photo; pass --model for a real "
                          "VLM.", highlight=False)
        with console.status("loading the model..."):
            vlm, processor = load_model(model, dev, dt)
        info = visualize(vlm, processor, img, spec.name, k, target, question=question)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(console, err) from None
    if "layers" in info:  # in-LLM: the tokens left from each cut layer on
        stages = ", ".join(f"{n} from layer {layer}"
                           for n, layer in zip(info["kept"], info["layers"], strict=True))
        console.print(f"{spec.name} keep={keep:g}: {stages}; answer: {info['answer']!r}")
    else:
        console.print(f"{spec.name} keep={keep:g}: {info['tokens']} tokens "
                      f"({info['kept']} kept, {info['merged_groups']} merged groups); "
                      f"answer: {info['answer']!r}")
    console.print(f"wrote {info['path']}")


@app.callback()
def main() -> None:
    """tokensieve: prune, merge and cluster visual tokens of VLMs, measured under one protocol."""


if __name__ == "__main__":
    app()
