"""The protocol end to end on a tiny random LLaVA (built offline), timing, plots, reports."""

from __future__ import annotations

import csv
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokensieve.bench import protocol
from tokensieve.bench.flops import Plan, VLMDims, account, llava15_dims
from tokensieve.bench.plot import pareto_front
from tokensieve.bench.protocol import BenchConfig, prepare, run, run_protocol
from tokensieve.bench.report import markdown_table, replace_between_markers
from tokensieve.bench.timing import PeakMemory, measure_generation, time_call

models = pytest.importorskip("tokensieve.models")


@pytest.fixture(scope="module")
def tiny():
    from tokensieve.bench.tiny import random_tiny_llava

    return random_tiny_llava()


@pytest.fixture(scope="module")
def samples():
    from tokensieve.zoo import scene_qa

    return scene_qa("test", 14)  # two per question family


def _oracle(half_when_patched: bool = True):
    """An answer function that is right on every sample for the unpatched model and on the
    even-indexed samples only for a patched one (so retention is known exactly)."""
    def answer(model, processor, samples, batch_size=16, max_new_tokens=1):
        patched = models.is_applied(model)
        return [s.answer if (not patched or i % 2 == 0) else "nonsense"
                for i, s in enumerate(samples)]
    return answer


@pytest.fixture(scope="module")
def result(tiny, samples, tmp_path_factory):
    import tokensieve.zoo as zoo

    model, processor = tiny
    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setattr(zoo, "answer", _oracle())
    try:
        res = run_protocol(
            BenchConfig(model="random-tiny", methods=("random", "pool"), keeps=(16, 8),
                        limit=len(samples), out=str(out), timing_repeats=1, timing_warmup=0,
                        timing_new_tokens=2),
            model=model, processor=processor, samples=samples)
    finally:
        mp.undo()
    return res, out


def test_writes_valid_json_csv_png(result, samples):
    res, out = result
    data = json.loads((out / "results.json").read_text())
    env = data["environment"]
    for key in ("torch", "transformers", "tokensieve", "device", "dtype", "seed", "samples",
                "torch_threads", "flops_convention"):
        assert key in env
    assert env["samples"] == len(samples) and env["dtype"] == "float32"
    cells = [(r["method"], r["keep"]) for r in data["rows"]]
    assert cells == [("full", 64), ("random", 16), ("random", 8), ("pool", 16), ("pool", 8)]
    for r in data["rows"][1:]:
        assert r["config"] == {"method": r["method"], "keep": r["keep"], "options": {},
                               "seed": 0}
        assert r["stage"] == "pre-llm" and r["plan"] == {
            "stage": "pre-llm", "schedule": [[0, r["keep"]]], "before_projector": False}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], int(r["keep"])) for r in rows] == cells
    assert {f"acc_{fam}" for fam in ("color", "count", "existence", "glyph", "region",
                                     "relation", "shape")} <= set(rows[0])
    with Image.open(out / "pareto.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
    assert res.files == {"json": str(out / "results.json"), "csv": str(out / "results.csv"),
                         "png": str(out / "pareto.png")}


def test_accuracy_and_retention_exact(result, samples):
    res, _ = result
    full = res.rows[0]
    assert full.accuracy["overall"] == 1.0 and full.retention["overall"] == 1.0
    even = [s for i, s in enumerate(samples) if i % 2 == 0]
    for r in res.rows[1:]:
        assert r.accuracy["overall"] == pytest.approx(len(even) / len(samples))
        for fam in {s.family for s in samples}:
            in_fam = [i for i, s in enumerate(samples) if s.family == fam]
            expect = sum(1 for i in in_fam if i % 2 == 0) / len(in_fam)
            assert r.accuracy[fam] == pytest.approx(expect)
            assert r.retention[fam] == pytest.approx(expect)  # full accuracy is 1


def test_costs_match_the_accounting(result, tiny):
    res, _ = result
    dims = VLMDims.from_config(tiny[0].config)
    text = res.rows[0].cost["text_tokens"]
    assert res.rows[0].cost["prefill_macs"] == account(dims, text_tokens=text,
                                                       bytes_per_element=4).prefill
    for r in res.rows[1:]:
        c = account(dims, Plan.pre_llm(r.keep), text_tokens=text, bytes_per_element=4)
        assert r.cost["prefill_macs"] == c.prefill
        assert r.cost["kv_cache_bytes"] == c.kv_cache_bytes
        assert r.cost["llm_tokens_first_layer"] == r.keep + text
    for r in res.rows:
        t = r.timing
        assert t["prefill_s"] > 0 and t["decode_s_per_token"] >= 0 and t["peak_memory_bytes"] > 0


def test_real_answers_match_zoo_scoring(tiny, samples, tmp_path):
    """Without an oracle: the full row's accuracy is the zoo's own scoring of the answers."""
    from tokensieve.zoo import accuracy_by_family, answer

    model, processor = tiny
    res = run_protocol(BenchConfig(model="random-tiny", methods=("random",), keeps=(8,),
                                   limit=4, out=str(tmp_path), timing_repeats=1,
                                   timing_warmup=0, timing_new_tokens=2),
                       model=model, processor=processor, samples=samples[:4])
    preds = answer(model, processor, samples[:4], max_new_tokens=1)
    assert res.rows[0].accuracy == accuracy_by_family(samples[:4], preds)
    assert not models.is_applied(model)  # every cell unpatched its model


def test_failing_cell_is_recorded_not_fatal(tiny, samples, tmp_path, monkeypatch):
    import tokensieve.zoo as zoo

    def flaky(model, processor, samples, batch_size=16, max_new_tokens=1):
        if models.is_applied(model) and models.get_state(model).config.method == "pool":
            raise ValueError("pool broke")
        return [s.answer for s in samples]

    monkeypatch.setattr(zoo, "answer", flaky)
    model, processor = tiny
    res = run_protocol(BenchConfig(methods=("random", "pool"), keeps=(16,), limit=2,
                                   out=str(tmp_path), timing_repeats=1, timing_warmup=0,
                                   timing_new_tokens=2),
                       model=model, processor=processor, samples=samples[:2])
    assert [r.error for r in res.rows] == [None, None, "ValueError: pool broke"]
    assert not models.is_applied(model)
    assert "pool@16" in markdown_table(json.loads((tmp_path / "results.json").read_text()))


# -- validation happens before any long work ------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (dict(keeps=(65,)), r"keep=65: expected a count in \[1, 64\]"),
    (dict(keeps=(0,)), r"keep=0"),
    (dict(methods=("divprun",)), r"unknown method 'divprun'; did you mean 'divprune'"),
    (dict(methods=("expedit",)), r"method 'expedit' acts at stage 'encoder'"),
    (dict(methods=("random",), keeps=(1.5,)), r"keep=1.5: expected a fraction in \(0, 1\]"),
    (dict(signal_layers=(99,)), r"layer 99 is not an encoder layer of this 3-layer tower"),
    (dict(signal_layers="last"), r"signal_layers='last'"),
    (dict(timing_repeats=0), r"timing_repeats=0"),
    (dict(dtype="float8"), r"dtype='float8'"),
    (dict(limit=0), r"limit=0"),
    (dict(device="tpu"), r"device='tpu'"),
])
def test_prepare_rejects_bad_settings(tiny, tmp_path, monkeypatch, change, match):
    import tokensieve.zoo as zoo

    monkeypatch.setattr(zoo, "answer", lambda *a, **k: pytest.fail("long work started"))
    cfg = BenchConfig(**{"methods": ("random",), "out": str(tmp_path), **change})
    with pytest.raises(ValueError, match=match):
        prepare(cfg, *tiny)


def test_unwritable_output_and_unknown_model(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        prepare(BenchConfig(out=str(blocker / "sub")))
    with pytest.raises(ValueError, match="no such folder"):
        prepare(BenchConfig(model=str(tmp_path / "missing" / "model"), out=str(tmp_path)))


def test_cuda_device_checked():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        protocol.parse_device("cuda")


def test_default_budgets_and_methods(tiny):
    assert protocol.default_keeps(576) == (192, 128, 64)
    assert protocol.default_keeps(64) == (21, 14, 7)
    chosen = protocol.default_methods(tiny[0], 7)
    assert 0 < len(chosen) <= protocol.DEFAULT_MAX_METHODS
    assert all(m in protocol.DEFAULT_METHODS for m in chosen)
    assert not models.is_applied(tiny[0])


def test_in_llm_plans_use_the_method_layer():
    from tokensieve.core.registry import list_methods

    if "dart" in list_methods():
        assert protocol._plan("dart", 64, 576, {}).stage == "llm"
    assert protocol._plan("random", 64, 576, {}) == Plan.pre_llm(64)
    if "tome" in list_methods():  # progressive schedule unknown: tower counted in full
        assert protocol._plan("tome", 64, 576, {}) == Plan.pre_llm(64, before_projector=True)
    if "visionzip" in list_methods():  # reduces the tower's features: projector on 64
        assert protocol._plan("visionzip", 64, 576, {}) == Plan.pre_llm(64, True)
    assert protocol._plan("full", 576, 576, {}) == Plan.full()


def test_pipeline_plans_count_the_in_llm_stage():
    """A pre-LLM method with its in-LLM stage (PruneVid, HoliTom): the LLM runs on the
    ``keep`` tokens entering it, then on what the stage keeps from its cut on."""
    import tokensieve as ts

    prune = ts.describe("prunevid-llm").make_config({})
    plan = protocol._plan("prunevid", 576, 1152, {}, 32, then=(prune, None))
    assert plan == Plan.llm_schedule([(0, 576), (11, int(576 * 0.4))])
    holi = ts.describe("holitom-llm").make_config({})
    plan = protocol._plan("holitom", 288, 1152, {}, 28, then=(holi, 0.25))
    cut, = holi.cut_layers(28)
    assert plan == Plan.llm_schedule([(0, 288), (cut, holi.image_tokens(288, [72])[0])])
    assert protocol._plan("prunevid", 576, 1152, {}, 32) == Plan.pre_llm(576)  # llm=None
    cost = account(llava15_dims(), protocol._plan("prunevid", 64, 576, {}, 32,
                                                     then=(prune, None)), text_tokens=40)
    alone = account(llava15_dims(), Plan.pre_llm(64), text_tokens=40)
    assert cost.llm_prefill < alone.llm_prefill and cost.llm_tokens[:11] == alone.llm_tokens[:11]
    todre = ts.describe("todre-llm").make_config({})     # a pipeline on the tower's features
    plan = protocol._plan("todre", 64, 576, {}, 32, then=(todre, None))
    assert plan.before_projector and plan.schedule[0] == (0, 64)
    both = account(llava15_dims(), plan, text_tokens=40)
    first = account(llava15_dims(), Plan.pre_llm(64, before_projector=True), text_tokens=40)
    assert both.projector == first.projector < alone.projector   # the projector on 64
    assert both.llm_prefill <= first.llm_prefill


# -- timing ---------------------------------------------------------------------------------
def test_time_call_counts_and_orders():
    calls = []
    times = time_call(lambda: (calls.append(1), time.sleep(0.01)), "cpu", warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and min(times) >= 0.009
    with pytest.raises(ValueError):
        time_call(lambda: None, "cpu", repeats=0)


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as pm:
        x = np.ones(40_000_000)  # 320 MB, touched
        x += 1
    del x
    assert pm.delta_bytes >= 300e6
    assert pm.peak_bytes >= pm.start_bytes + 300e6


def test_measure_generation_on_tiny(tiny, samples):
    from tokensieve.zoo import build_prompt

    model, processor = tiny
    enc = processor(text=[build_prompt(processor, samples[0].question)],
                    images=[samples[0].image], return_tensors="pt")
    t = measure_generation(model, enc, new_tokens=3, warmup=0, repeats=1)
    assert t.prefill_s > 0 and t.batch_size == 1 and t.new_tokens == 3
    assert t.tokens_per_s == pytest.approx(1 / t.decode_s_per_token)
    with pytest.raises(ValueError, match="new_tokens"):
        measure_generation(model, enc, new_tokens=1)


# -- plots and reports ----------------------------------------------------------------------
def test_pareto_front_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(rng.randint(1, 12))]
        front = set(pareto_front(pts))
        for i, (x, y) in enumerate(pts):
            dominated = any((x2 <= x and y2 > y) or (x2 < x and y2 >= y)
                            for j, (x2, y2) in enumerate(pts) if j != i)
            duplicate_earlier = any(pts[j] == (x, y) for j in range(i))
            if dominated:
                assert i not in front
            elif not duplicate_earlier:
                assert i in front or any(pts[j] == (x, y) for j in front)


def test_markdown_table_and_readme_script(result, tmp_path):
    _, out = result
    data = json.loads((out / "results.json").read_text())
    table = markdown_table(data)
    lines = table.splitlines()
    assert lines[0].startswith("| method | tokens | accuracy")
    assert lines[2].startswith("| full | 64 | 100.0% | 100.0% |")
    assert sum(1 for ln in lines if ln.startswith("| random | ")) == 2
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\ntail\n")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import make_readme_figures
    finally:
        sys.path.pop(0)
    docs = tmp_path / "docs"
    assert make_readme_figures.main([str(out), "--docs", str(docs), "--readme",
                                     str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| full | 64 | 100.0%" in text and text.endswith("tail\n")
    assert (docs / "pareto.png").is_file() and "per question family" in (
        docs / "results.md").read_text()
    assert "| full | 3.82 |" in (docs / "llava15-cost.md").read_text()
    assert make_readme_figures.main([str(tmp_path / "nothing")]) == 2
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers("no markers", "x")
    # a second, named block (the video benchmark's) is replaced on its own
    both = "a\n<!-- bench-table:start -->\ni\n<!-- bench-table:end -->\n" \
           "<!-- video-table:start -->\nv\n<!-- video-table:end -->\n"
    out_text = replace_between_markers(both, "new", "video-table")
    assert "\ni\n" in out_text and "\nv\n" not in out_text and "new" in out_text
    with pytest.raises(ValueError, match="video-table"):
        replace_between_markers("a", "x", "video-table")


def test_run_uses_prepared_cells(tiny, samples, tmp_path, monkeypatch):
    import tokensieve.zoo as zoo

    monkeypatch.setattr(zoo, "answer", _oracle())
    prepared = prepare(BenchConfig(methods=("random",), keeps=(64, 32), limit=2,
                                   out=str(tmp_path), timing_repeats=1, timing_warmup=0,
                                   timing_new_tokens=2), *tiny)
    assert prepared.cells == [("full", 64), ("random", 32)]  # keep == N is the full model
    seen = []
    res = run(prepared, progress=seen.append, samples=samples[:2])
    assert seen == ["full @ 64", "random @ 32", protocol.TIMING_STEP] and len(res.rows) == 2


class _SleepyModel(torch.nn.Module):
    """generate(): 60 ms before the prompt is pushed (vision + reduction), 30 ms of prefill,
    then 10 ms per further token; pushes tokens to the streamer as HF generate does."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens, min_new_tokens, do_sample, streamer=None):
        time.sleep(0.06)
        if streamer is not None:
            streamer.put(input_ids)
        for i in range(max_new_tokens):
            time.sleep(0.03 if i == 0 else 0.01)
            if streamer is not None:
                streamer.put(input_ids[:, :1])
        if streamer is not None:
            streamer.end()
        return input_ids


def test_measure_generation_splits_prefill_and_decode():
    t = measure_generation(_SleepyModel(), {"input_ids": torch.zeros(2, 5, dtype=torch.long)},
                           new_tokens=4, warmup=0, repeats=2)
    assert 0.088 <= t.prefill_s < 0.2  # 60 + 30 ms: from the call to the first token
    assert 0.0095 <= t.decode_s_per_token < 0.05
    assert t.batch_size == 2 and t.tokens_per_s == pytest.approx(2 / t.decode_s_per_token)
    assert t.prefill_cpu_s < 0.03 and t.decode_cpu_s_per_token < 0.005  # sleeping is not CPU


def test_model_without_adapter_is_refused(tmp_path):
    """A model no adapter supports fails in prepare, naming the reason."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokensieve.bench.tiny import random_tiny_llava

    _, processor = random_tiny_llava()
    text_only = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             vocab_size=64))
    with pytest.raises(ValueError, match="no vision tower"):
        prepare(BenchConfig(out=str(tmp_path)), text_only, processor)


# -- robust timing: alternation, spreads, selection work ------------------------------------
def test_spread_statistics():
    from tokensieve.bench.timing import LARGE_SPREAD, Spread

    s = Spread.of([0.010, 0.011, 0.012, 0.013, 0.100])
    assert s.median == 0.012 and s.min == 0.010 and s.max == 0.100
    assert s.iqr == pytest.approx(0.002) and not s.large
    assert Spread.of([1.0]).iqr == 0.0
    noisy = Spread.of([1.0, 1.0, 2.0, 2.0])
    assert noisy.relative > LARGE_SPREAD and noisy.large
    with pytest.raises(ValueError, match="no measurements"):
        Spread.of([])


def test_variants_are_timed_in_alternation():
    """Round r runs every variant once (reversed on odd rounds), never one block each."""
    from tokensieve.bench.timing import Variant, measure_interleaved

    log: list[str] = []
    model = _SleepyModel()
    variants = [Variant(name, enter=lambda n=name: log.append(n),
                        selection=(lambda: time.sleep(0.002)) if name != "a" else None)
                for name in ("a", "b", "c")]
    out = measure_interleaved(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)},
                              variants, new_tokens=2, warmup=1, repeats=3)
    rounds = [log[i:i + 3] for i in range(0, 12, 3)]
    assert rounds == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"], ["c", "b", "a"]]
    assert log[12:] == ["a", "b", "c"]  # then one peak-memory run each
    assert out["a"].selection_s is None and out["b"].selection_s >= 0.0019
    d = out["b"].to_dict()
    for name in ("prefill_s", "decode_s_per_token", "prefill_cpu_s", "selection_s"):
        assert d[f"{name}_min"] <= d[name] <= d[f"{name}_max"] and d[f"{name}_iqr"] >= 0
    assert d["repeats"] == 3 and d["interleaved_with"] == 3
    assert out["a"].to_dict()["selection_s_iqr"] is None


def test_results_carry_spreads_and_selection_time(result):
    res, out = result
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for col in ("prefill_s_iqr", "prefill_s_min", "prefill_s_max", "decode_s_per_token_iqr",
                "selection_s", "selection_s_iqr", "large_spread"):
        assert col in rows[0]
    assert rows[0]["selection_s"] == ""  # the full model selects nothing
    data = json.loads((out / "results.json").read_text())
    for r in data["rows"][1:]:  # random and pool: their reduce calls were replayed and timed
        t = r["timing"]
        assert t["selection_s"] > 0 and t["selection_s_min"] <= t["selection_s"]
        assert t["interleaved_with"] == len(data["rows"])


def test_selection_capture_records_the_adapter_calls(tiny, samples):
    from tokensieve.bench.selection import capture_reduce_calls, replay
    from tokensieve.zoo import build_prompt

    model, processor = tiny
    enc = processor(text=[build_prompt(processor, samples[0].question)],
                    images=[samples[0].image], return_tensors="pt")
    assert capture_reduce_calls(model, enc) == []
    models.apply(model, "fastervlm", 8)
    try:
        calls = capture_reduce_calls(model, enc)
    finally:
        models.remove(model)
    assert len(calls) == 1 and calls[0].args[1] == "fastervlm" and "cls_attn" in calls[0].kwargs
    assert calls[0]().num_tokens == 8
    replay(calls)()


def test_fractions_all_methods_and_signal_layers(tiny, tmp_path, monkeypatch):
    import tokensieve.zoo as zoo

    monkeypatch.setattr(zoo, "answer", lambda *a, **k: pytest.fail("long work started"))
    p = prepare(BenchConfig(methods=("random",), keeps=(0.25, 16, 8), out=str(tmp_path)), *tiny)
    assert p.keeps == (16, 8)  # 0.25 of 64 tokens = 16, the count 16 once
    p = prepare(BenchConfig(methods=("all",), keeps=(8,), out=str(tmp_path)), *tiny)
    expect = [m for m in protocol.list_methods() if protocol.method_runs(m)["bench"]
              and protocol.supported(tiny[0], m, 8) is None]
    assert list(p.methods) == expect and "random" in p.methods and "tome" not in p.methods
    assert "fastv" not in p.methods  # FastV's layer 2 does not exist in a 2-layer LLM
    seen = {}
    real_apply = models.apply

    def spy(model, method, keep=None, **kw):
        seen[method] = kw.get("signal_layers")
        return real_apply(model, method, keep, **kw)

    monkeypatch.setattr(models, "apply", spy)
    prepare(BenchConfig(methods=("fastervlm",), keeps=(8,), signal_layers=(0, "feature"),
                        out=str(tmp_path)), *tiny)
    assert seen["fastervlm"] == (0, "feature")


def test_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "_hub_cached", lambda name: False)
    monkeypatch.setattr(protocol, "load_model", lambda *a, **k: pytest.fail("loading started"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model='org/some-vlm'.*HF_HUB_OFFLINE is set"):
        prepare(BenchConfig(model="org/some-vlm", out=str(tmp_path)))
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr("socket.create_connection", no_network)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"model='org/some-vlm'.*no connection to"):
        prepare(BenchConfig(model="org/some-vlm", out=str(tmp_path)))
    assert time.perf_counter() - t0 < 5


def test_plot_colours_unique_per_method(result, tmp_path):
    from tokensieve.bench.plot import method_colors, pareto_plot

    for n in (3, 11, 24, 70):
        names = ["full"] + [f"m{i}" for i in range(n)]
        colors = method_colors(names)
        assert len(colors) == n + 1 and len(set(colors.values())) == n + 1
        assert colors["full"] == (0.0, 0.0, 0.0, 1.0)
    # a results file with 12 methods plots with 13 distinct line colours
    _, out = result
    data = json.loads((out / "results.json").read_text())
    base = data["rows"][1]
    data["rows"] = data["rows"][:1] + [{**base, "method": f"m{i}"} for i in range(12)]
    data["rows"][3]["timing"] = {**base["timing"], "large_spread": ["prefill_s"]}
    import matplotlib.pyplot as plt

    seen = []
    real = plt.Axes.plot

    def spy(self, *a, **k):
        if "label" in k and k["label"] != "Pareto front":
            seen.append((k["label"], tuple(k["color"])))
        return real(self, *a, **k)

    texts = []
    real_text = plt.Figure.text

    def spy_text(self, x, y, s, *a, **k):
        texts.append(s)
        return real_text(self, x, y, s, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(plt.Axes, "plot", spy)
    mp.setattr(plt.Figure, "text", spy_text)
    try:
        pareto_plot(data, tmp_path / "p.png")
    finally:
        mp.undo()
    per_method = dict(seen)
    assert len(per_method) == 13 and len(set(per_method.values())) == 13
    assert any("large latency spread" in t and "m2@" in t for t in texts)


def test_markdown_table_marks_large_spread(result):
    _, out = result
    data = json.loads((out / "results.json").read_text())
    data["rows"][1]["timing"]["large_spread"] = ["prefill_s"]
    table = markdown_table(data)
    row = next(ln for ln in table.splitlines() if ln.startswith("| random | 16 |"))
    assert row.count(" ±") == 3 and " !" in row
    assert "large spread (IQR / median > 20 %): random@16" in table
