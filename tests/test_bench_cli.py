"""`tokensieve bench` / `tokensieve viz`: a smoke run, and clear errors before long work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tokensieve.bench import protocol
from tokensieve.bench.viz import draw_token_map, token_map
from tokensieve.cli import app
from tokensieve.core.reduction import Reduction

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


@pytest.fixture
def no_long_work(monkeypatch):
    """Any model load or evaluation fails the test: errors must come first."""
    def boom(*a, **k):
        pytest.fail("long work started before the bad input was reported")

    monkeypatch.setattr(protocol, "load_model", boom)
    monkeypatch.setattr(protocol, "run", boom)


def test_list_still_works():
    res = _invoke("list")
    assert res.exit_code == 0 and "fastervlm" in res.output


def test_list_marks_where_methods_run():
    res = _invoke("list")
    assert res.exit_code == 0
    assert "apply" in res.output and "bench" in res.output and "viz" in res.output
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:7]]
            for ln in res.output.splitlines() if ln.count("│") > 8 and ln.split("│")[1].strip()}
    assert rows["fastervlm"] == ["pre-llm", "subset", "yes", "yes", "yes"]
    assert rows["fastv"] == ["llm", "subset", "yes", "yes", "yes"]
    assert rows["pdrop"][2:] == ["yes", "yes", "yes"]
    assert rows["tome"] == ["encoder", "merge", "yes", "yes", "yes"]  # keep maps to r
    assert rows["expedit"] == ["encoder", "merge", "yes", "-", "-"]  # its own options only
    assert rows["ats"] == ["encoder", "subset", "yes", "yes", "yes"]  # keep caps each layer
    assert rows["dycoke-llm"] == ["llm", "subset", "yes", "yes", "-"]  # decoding only
    assert rows["kmedoids"] == ["encoder", "subset", "yes", "yes", "yes"]  # keep = clusters
    assert "ts.reduce only: none." in " ".join(res.output.split())


def test_bench_all_fractions_and_signal_layers_reach_the_run(tmp_path, monkeypatch):
    """--methods all asks protocol.supported; --keep 0.25 is a quarter of 64 tokens;
    --signal-layers reaches ts.apply (recorded in the config)."""
    pytest.importorskip("tokensieve.models")
    seen = {}

    def stop(prepared, progress=None):
        seen["prepared"] = prepared
        raise ValueError("stopped before the long work")

    monkeypatch.setattr(protocol, "run", stop)
    res = _invoke("bench", "--model", "random-tiny", "--methods", "all", "--keep", "0.25,8",
                  "--signal-layers", "0,feature", "--out", str(tmp_path))
    assert res.exit_code == 2 and "stopped before" in res.output, res.output
    p = seen["prepared"]
    assert p.keeps == (16, 8) and p.config.signal_layers == (0, "feature")
    expect = [m for m in protocol.list_methods() if protocol.method_runs(m)["bench"] and all(
        protocol.supported(p.model, m, k, **protocol.apply_options(m, (0, "feature"))) is None
        for k in (16, 8))]
    assert list(p.methods) == expect and {"random", "fastervlm", "divprune"} <= set(expect)


def test_bench_hub_id_without_network_fails_before_loading(no_long_work, tmp_path,
                                                           monkeypatch):
    monkeypatch.setattr(protocol, "_hub_cached", lambda name: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = _invoke("bench", "--model", "someone/some-vlm", "--out", str(tmp_path))
    assert res.exit_code == 2 and "'someone/some-vlm'" in res.output
    assert "hub cannot be reached" in res.output


def test_printed_table_warns_on_large_spread():
    from rich.console import Console

    from tokensieve.bench.protocol import BenchResult, Row
    from tokensieve.cli import _print_results

    timing = {"prefill_s": 0.030, "prefill_s_iqr": 0.012, "decode_s_per_token": 0.002,
              "decode_s_per_token_iqr": 0.0001, "selection_s": 0.001, "selection_s_iqr": 0.0,
              "tokens_per_s": 500.0, "peak_memory_bytes": 2**20, "peak_memory_delta_bytes": 0,
              "large_spread": ["prefill_s"]}
    row = Row(method="random", keep=16, stage="pre-llm", config={}, accuracy={"overall": 0.5},
              retention={"overall": 1.0}, cost={"prefill_macs": 1e9, "kv_cache_bytes": 2**20},
              timing=timing, eval_seconds=1.0)
    console = Console(width=200, record=True)
    _print_results(console, BenchResult(environment={}, config={}, model={}, rows=[row]))
    text = console.export_text()
    assert "30.0 ±12.0 !" in text and "warning: large latency spread" in text
    assert "random@16 (prefill_s)" in text


@pytest.mark.parametrize("args, message", [
    (["--methods", "divprun"], "unknown method 'divprun'"),
    (["--keep", "abc"], "--keep 'abc'"),
    (["--dtype", "float8"], "dtype='float8'"),
    (["--limit", "0"], "limit=0"),
    (["--limit", "2001"], "the test split has 2000 samples"),
    (["--answer-tokens", "0"], "answer_tokens=0"),
    (["--device", "tpu"], "device='tpu'"),
    (["--keep", "1.5"], "--keep '1.5': keep=1.5: expected a fraction in (0, 1]"),
    (["--keep", "0"], "--keep '0'"),
    (["--methods", "expedit"], "method 'expedit' acts at stage 'encoder'"),
    (["--methods", "all,divprun"], "unknown method 'divprun'"),
    (["--signal-layers", "9,last"], "--signal-layers '9,last'"),
    (["--repeats", "0"], "timing_repeats=0"),
])
def test_bench_bad_input_fails_fast(no_long_work, tmp_path, args, message):
    res = _invoke("bench", "--out", str(tmp_path), *args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_bench_unwritable_output(no_long_work, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _invoke("bench", "--out", str(blocker / "sub"))
    assert res.exit_code == 2 and "not writable" in res.output


def test_bench_unknown_model_and_budget(tmp_path):
    res = _invoke("bench", "--model", str(tmp_path / "nope" / "model"), "--out", str(tmp_path))
    assert res.exit_code == 2 and "no such folder" in res.output
    res = _invoke("bench", "--model", "random-tiny", "--keep", "100", "--out", str(tmp_path))
    assert res.exit_code == 2 and "keep=100" in res.output and "64 visual tokens" in res.output


def test_bench_smoke_run(tmp_path):
    pytest.importorskip("tokensieve.models")
    res = _invoke("bench", "--model", "random-tiny", "--methods", "random,pool", "--keep",
                  "16", "--limit", "2", "--repeats", "1", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "methods: random, pool; keep: 16; 3 runs" in res.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["keep"]) for r in data["rows"]] == [("full", 64), ("random", 16),
                                                                 ("pool", 16)]
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "pareto.png").is_file()


def test_bench_without_checkpoint_says_so(tmp_path):
    from tokensieve.zoo import checkpoint_available

    if checkpoint_available():
        pytest.skip("the embedded checkpoint is installed (a no-argument run is the real bench)")
    res = _invoke("bench", "--out", str(tmp_path))
    assert res.exit_code == 2 and "checkpoint" in res.output and "random-tiny" in res.output


# -- viz ------------------------------------------------------------------------------------
def test_viz_bad_inputs(no_long_work, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = _invoke("viz", str(bad), "--method", "pool", "--keep", "64")
    assert res.exit_code == 2 and "cannot be decoded" in res.output
    res = _invoke("viz", str(tmp_path / "missing.png"), "--method", "pool", "--keep", "64")
    assert res.exit_code == 2 and "no such file" in res.output
    good = tmp_path / "img.png"
    Image.new("RGB", (32, 32), "red").save(good)
    res = _invoke("viz", str(good), "--method", "nosuch", "--keep", "64")
    assert res.exit_code == 2 and "unknown method 'nosuch'" in res.output
    res = _invoke("viz", str(good), "--method", "pool", "--keep", "64", "--out",
                  str(tmp_path / "x.jpg"))
    assert res.exit_code == 2 and "expected a .png" in res.output
    res = _invoke("viz", str(good), "--method", "pool", "--keep", "1.5")
    assert res.exit_code == 2 and "--keep 1.5" in res.output
    res = _invoke("viz", str(good), "--method", "expedit", "--keep", "64")
    assert res.exit_code == 2 and "stage 'encoder'" in res.output


def test_viz_warns_on_a_real_photo_with_the_embedded_model(tmp_path, monkeypatch):
    from tokensieve.zoo import scene_qa

    def stop(*a, **k):
        raise ValueError("stopped at loading")

    monkeypatch.setattr(protocol, "load_model", stop)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)).save(
        photo)
    res = _invoke("viz", str(photo), "--method", "pool", "--keep", "64")
    assert "synthetic-scene model" in res.output and "stopped at loading" in res.output
    scene = tmp_path / "scene.png"
    scene_qa("test", 1)[0].image.save(scene)
    res = _invoke("viz", str(scene), "--method", "pool", "--keep", "64")
    assert "synthetic-scene" not in res.output and "stopped at loading" in res.output
    res = _invoke("viz", str(photo), "--method", "pool", "--keep", "16", "--model",
                  "random-tiny")
    assert "synthetic-scene" not in res.output  # another model: no warning


def test_viz_refuses_video_methods(no_long_work, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(img)
    res = _invoke("viz", str(img), "--method", "evs", "--keep", "0.5")
    assert res.exit_code == 2 and "reduces video clips" in res.output


def test_viz_runs_on_random_tiny(tmp_path):
    pytest.importorskip("tokensieve.models")
    from tokensieve.zoo import scene_qa

    img = tmp_path / "scene.png"
    scene_qa("test", 1)[0].image.save(img)
    out = tmp_path / "viz.png"
    res = _invoke("viz", str(img), "--method", "pool", "--keep", "16", "--model", "random-tiny",
                  "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "16 tokens (0 kept, 16 merged groups)" in res.output
    with Image.open(out) as im:
        assert im.format == "PNG"
    res = _invoke("viz", str(img), "--method", "fastervlm", "--keep", "8", "--model",
                  "random-tiny", "--out", str(out))
    assert res.exit_code == 0 and "8 tokens (8 kept, 0 merged groups)" in res.output


def test_viz_draws_each_cut_of_an_in_llm_method(tmp_path):
    """An in-LLM method: one panel per cut layer, the tokens that survive from it on."""
    from tokensieve.zoo import scene_qa

    img = tmp_path / "scene.png"
    scene_qa("test", 1)[0].image.save(img)
    out = tmp_path / "pdrop.png"
    res = _invoke("viz", str(img), "--method", "pdrop", "--keep", "0.75", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "from layer 1" in res.output and "from layer 2" in res.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height  # panels side by side


def test_stage_maps_mark_the_survivors():
    from tokensieve.bench.viz import stage_maps
    from tokensieve.models._llm import Cut

    cuts = [Cut(layer=2, kept=[torch.tensor([0, 5, 8])]), Cut(layer=4, kept=[torch.tensor([5])])]
    (name0, first), (name1, second) = stage_maps(cuts, 0, (3, 3))
    assert name0 == "from LLM layer 2 on" and name1 == "from LLM layer 4 on"
    assert first.kept.reshape(-1).nonzero()[0].tolist() == [0, 5, 8]
    assert second.kept.reshape(-1).nonzero()[0].tolist() == [5] and second.dropped.sum() == 8


def test_token_map_subset_merge_and_cls():
    # subset: kept = indices; the CLS offset shifts source positions by one
    r = Reduction(tokens=torch.zeros(1, 3, 4), indices=torch.tensor([[1, 5, 16]]))
    tm = token_map(r, (4, 4), offset=1)
    assert tm.kept.sum() == 3 and tm.kept[0, 0] and tm.kept[1, 0] and tm.kept[3, 3]
    assert (tm.group < 0).all() and tm.dropped.sum() == 13
    # merge: 2x2 windows of a 4x4 grid -> 4 groups of 4, nothing kept or dropped
    slot = torch.tensor([(i // 8) * 2 + (i % 4) // 2 for i in range(16)])
    r = Reduction(tokens=torch.zeros(1, 4, 4), assignment=slot.unsqueeze(0),
                  positions=torch.tensor([[0, 2, 8, 10]]), sizes=torch.full((1, 4), 4))
    tm = token_map(r, (4, 4))
    assert (tm.group == slot.reshape(4, 4).numpy()).all()
    assert not tm.kept.any() and not tm.dropped.any()
    assert tm.centres == [(0, 0), (0, 2), (2, 0), (2, 2)]
    # subset + merge: token 0 kept alone, tokens 1-3 merged into slot 1, the rest dropped
    assign = torch.full((1, 16), -1)
    assign[0, 0], assign[0, 1:4] = 0, 1
    r = Reduction(tokens=torch.zeros(1, 2, 4), indices=torch.tensor([[0]]), assignment=assign)
    tm = token_map(r, (4, 4))
    assert tm.kept.sum() == 1 and (tm.group == 1).sum() == 3 and tm.dropped.sum() == 12
    with pytest.raises(ValueError, match="assignment covers 16"):
        token_map(r, (4, 4), offset=1)
    with pytest.raises(ValueError, match="nothing to draw"):
        token_map(Reduction(tokens=torch.zeros(1, 2, 4)), (4, 4))


def test_draw_token_map_writes_png(tmp_path):
    slot = torch.tensor([(i // 8) * 2 + (i % 4) // 2 for i in range(16)])
    r = Reduction(tokens=torch.zeros(1, 4, 4), assignment=slot.unsqueeze(0))
    path = tmp_path / "m.png"
    draw_token_map(np.random.default_rng(0).random((32, 32, 3)), token_map(r, (4, 4)), path,
                   "title")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 400


def test_bench_and_viz_load_a_local_model_folder(tmp_path):
    """--model PATH: a saved LLaVA folder (weights, config, processor) loads offline."""
    pytest.importorskip("tokensieve.models")
    from tokensieve.bench.tiny import random_tiny_llava
    from tokensieve.zoo import scene_qa

    model, processor = random_tiny_llava(seed=3)
    folder = tmp_path / "tiny-llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path / "out"
    res = _invoke("bench", "--model", str(folder), "--methods", "fastervlm", "--keep", "8",
                  "--limit", "2", "--repeats", "1", "--out", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["model"]["name"] == str(folder) and data["model"]["visual_tokens"] == 64
    img = tmp_path / "scene.png"
    scene_qa("test", 1)[0].image.save(img)
    res = _invoke("viz", str(img), "--method", "divprune", "--keep", "0.25", "--model",
                  str(folder), "--out", str(tmp_path / "v.png"))
    assert res.exit_code == 0, res.output
    assert "16 tokens (16 kept, 0 merged groups)" in res.output


def test_group_outlines_are_perimeters():
    from tokensieve.bench.viz import _group_edges

    g = np.full((4, 4), -1)
    g[1:3, 1:3] = 5  # a 2x2 block: perimeter of 8 unit edges
    g[0, 0] = g[1, 0] = 7  # a vertical 1x2 bar
    edges = _group_edges(g)
    assert sorted(edges) == [5, 7]
    assert len(edges[5]) == 8 and len(edges[7]) == 6  # a 1x2 bar: 6 unit edges
    assert ((1, 1), (3, 1)) not in edges[5] and ((1, 1), (2, 1)) in edges[5]
