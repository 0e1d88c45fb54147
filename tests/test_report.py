"""`lowbit report`: the tables join measured numbers to the report's cells, recovery is the
report's ratio, the files are self-contained, and a second run reuses the cache."""

import json
from pathlib import Path

import pytest

from conftest import byte_tokenizer, tiny_llama
from lowbit.cli import main
from lowbit.reports import compression
from lowbit.reports.compression import FULL, QUICK, RECIPES, ModelSize, Results, command, estimate_seconds, run_report
from lowbit.reports.tables import best_of, markdown, speed, table_83, table_93, to_html


def row(family, ppl, reference=10.0, kld=0.1, top1=80.0, nbytes=1_000_000, bits=4.0, cost=5.0, tps=50.0, roof=100.0):
    scores = {c: {"perplexity": ppl, "reference_perplexity": reference, "kld": kld, "top1_percent": top1, "bits_per_weight": bits,
                  "model_bytes": nbytes} for c in ("pydoc", "shakespeare")}
    return {"family": family, "steps": [{"command": "lowbit x", "seconds": cost, "peak_rss_mb": 100}], "cost_seconds": cost,
            "peak_rss_mb": 100, "scores": scores, "decode_tokens_per_second": tps, "roofline": {"tokens_per_second": roof}}


SMOLLM2 = ModelSize(134_515_008, 106_202_880, 49_152)
GEMMA3 = ModelSize(268_098_176, 100_325_376, 262_144)


def synthetic():
    return Results("m", FULL, {
        "float": row("float", 10.0, kld=None, top1=None, nbytes=4_000_000, bits=32.0, cost=0.0, tps=40.0, roof=25.0),
        "rtn W4 g128": row("PTQ", 13.0, cost=2.0),
        "gptq W4 g128": row("PTQ", 11.0, cost=90.0, tps=80.0),
        "wanda 2:4": row("structured pruning", 20.0, nbytes=2_250_000, bits=9.0),
        "sparsegpt 2:4": row("structured pruning", 16.0, nbytes=2_250_000, bits=9.0, cost=130.0, tps=20.0, roof=44.0),
    })


def test_table_93_shows_each_familys_best_row_beside_the_reports_cells():
    results = synthetic()
    assert best_of(results, "PTQ")[0] == "gptq W4 g128" and best_of(results, "structured pruning")[0] == "sparsegpt 2:4"
    text = table_93(results)
    assert "High (Tensor Cores) **Measured:** 80.0 tok/s (2.00x float); roofline 4.00x (gptq W4 g128)" in text
    assert "**Measured:** 2.2 MB, 1.78x smaller than float (sparsegpt 2:4)" in text
    assert "Low (Calibration) **Measured:** 90 s (gptq W4 g128)" in text
    assert "Distillation" not in text  # no row measured, no column


def test_recovery_is_the_float_score_over_the_quantised_one():
    text = table_83(synthetic())
    assert "| m | float32 source | gptq W4 g128 | pydoc perplexity | 10.000 | 11.000 | 90.9% |" in text
    assert "| m | float32 source | sparsegpt 2:4 | pydoc top-1 agreement | 100.0 | 80.0 | 80.0% |" in text


def test_the_html_page_holds_its_tables_and_images(tmp_path):
    (tmp_path / "m_pareto.png").write_bytes(b"\x89PNG fake")
    text = markdown([synthetic()], {"m": {"pareto": tmp_path / "m_pareto.png"}}, "lowbit report")
    page = to_html(text, tmp_path)
    assert page.count("<table>") == text.count("\n|---") and "data:image/png;base64," in page and "<b>Measured:</b>" in page


def test_commands_take_the_protocols_settings_where_they_apply(tmp_path):
    by_key = {r.key: r for r in RECIPES}
    gptq = command(by_key["gptq W4 g128"].steps[0], "smollm2", tmp_path / "o", QUICK)
    assert gptq[:2] == ["quantize", "--method"] and "--calib-samples" in gptq and gptq[-4:] == ["--model", "smollm2", "--out", str(tmp_path / "o")]
    assert "--calib-samples" not in command(by_key["rtn W4 g128"].steps[0], "smollm2", tmp_path / "o", QUICK)
    distill = command(by_key["distilled half"].steps[0], "smollm2", tmp_path / "o", QUICK)
    assert distill[distill.index("--teacher") + 1] == "smollm2" and distill[distill.index("--steps") + 1] == "4"
    seconds, missing = estimate_seconds({"smollm2": SMOLLM2}, list(RECIPES), FULL, tmp_path)
    assert missing == len(RECIPES) and 3600 < seconds < 6 * 3600


def test_the_estimate_counts_a_shared_chain_once_and_one_reference_per_batch(tmp_path):
    by_key = {r.key: r for r in RECIPES}
    model = {"smollm2": SMOLLM2}
    alone = [estimate_seconds(model, [by_key[key]], FULL, tmp_path)[0] for key in ("distilled half", "distilled half + gptq W4")]
    together, missing = estimate_seconds(model, [by_key["distilled half"], by_key["distilled half + gptq W4"]], FULL, tmp_path)
    assert missing == 2
    # the distillation (over 20 min) runs once for both rows
    assert together < sum(alone) - 1200
    four = [by_key[key] for key in ("rtn W4 g128", "gptq W4 g128", "awq W4 g128", "nf4 g64")]
    assert estimate_seconds(model, four, FULL, tmp_path)[0] < sum(estimate_seconds(model, [r], FULL, tmp_path)[0] for r in four)


def test_model_sizes_count_a_tied_head_once_and_the_blocks_apart():
    from lowbit.loader import open_skeleton

    assert ModelSize.of(open_skeleton("smollm2")) == SMOLLM2
    assert ModelSize.of(open_skeleton("gemma3-270m")) == GEMMA3


def test_a_calibrated_step_scales_with_the_blocks_and_scoring_with_every_parameter(tmp_path):
    """Gemma 3 has twice SmolLM2's parameters but fewer in its blocks: its GPTQ step costs
    about SmolLM2's (measured 75 s against 67), its scoring about twice, its QAT between
    (measured 2,584 s against 1,634), its distillation four times (6,589 s against 1,617)."""
    gptq, float_row = [next(r for r in RECIPES if r.key == key) for key in ("gptq W4 g128", "float")]

    def step(size):
        return estimate_seconds({"m": size}, [gptq], FULL, tmp_path)[0] - estimate_seconds({"m": size}, [float_row], FULL, tmp_path)[0]

    assert step(GEMMA3) == pytest.approx(step(SMOLLM2), rel=0.1)
    score = [estimate_seconds({"m": size}, [float_row], FULL, tmp_path)[0] for size in (SMOLLM2, GEMMA3)]
    assert score[1] > 1.8 * score[0]
    qat = next(r for r in RECIPES if r.key == "qat W4 g128")
    train = [estimate_seconds({"m": size}, [qat], FULL, tmp_path)[0] - s for size, s in zip((SMOLLM2, GEMMA3), score)]
    assert 1.3 < train[1] / train[0] < 1.9  # the blocks train alike, the head's passes double
    distill = next(r for r in RECIPES if r.key == "distilled half")
    taught = [estimate_seconds({"m": size}, [distill], FULL, tmp_path)[0] - s for size, s in zip((SMOLLM2, GEMMA3), score)]
    assert taught[1] > 3 * taught[0]  # and distillation's softmaxes over a 5.3x vocabulary (measured 1,617 s and 6,589 s)


def test_roofline_ratios_compare_rows_at_one_bandwidth():
    """Each row's roofline used the bandwidth read when it ran; the ratio to float divides it
    out (a row read at twice the bandwidth does not look twice as fast)."""
    float_row = row("float", 10.0, roof=25.0)
    float_row["roofline"]["bandwidth_gbps"] = 20.0
    quantised = row("PTQ", 11.0, roof=200.0)  # 8x float's prediction, at twice the bandwidth: 4x at one
    quantised["roofline"]["bandwidth_gbps"] = 40.0
    assert speed(quantised, float_row).endswith("roofline 4.00x")


def test_a_recipe_that_starts_with_another_reuses_its_output(tmp_path, monkeypatch):
    """Distil-then-quantise starts from the student "distilled half" made in the same run
    (one distillation, not two); its cost still counts the distillation's seconds."""
    calls = []

    def fake_lowbit(argv, log):
        calls.append(argv)
        if argv[0] == "eval":  # one row per model scored, after the reference's
            scored = argv[1 : argv.index("--corpus")]
            results = [{"perplexity": 10.0}] + [{"perplexity": 11.0, "kld": 0.1, "top1_percent": 90.0, "bits_per_weight": 4.0, "model_bytes": 1}] * len(scored)
            Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"results": results}))
        return {"seconds": 5.0, "peak_rss_mb": 100, "output": "decode 10.0 tokens/s"}

    monkeypatch.setattr(compression, "_lowbit", fake_lowbit)
    monkeypatch.setattr(compression, "roofline", lambda ref, protocol: {})
    by_key = {r.key: r for r in RECIPES}
    chosen = [by_key["distilled half"], by_key["rtn W4 g128"], by_key["distilled half + gptq W4"]]
    (results,) = run_report(["smollm2"], chosen, QUICK, tmp_path / "cache", progress=lambda message: None)
    distills = [c for c in calls if c[0] == "distill"]
    assert len(distills) == 1
    student = distills[0][distills[0].index("--out") + 1]
    gptq = next(c for c in calls if c[:3] == ["quantize", "--method", "gptq"])
    assert gptq[gptq.index("--model") + 1] == student
    both = results.rows["distilled half + gptq W4"]
    assert both["steps"][0]["reused"] and both["steps"][0]["command"] == results.rows["distilled half"]["steps"][0]["command"]
    assert both["cost_seconds"] == 10.0 and "reused" not in results.rows["rtn W4 g128"]["steps"][0]
    evals = [c for c in calls if c[0] == "eval"]  # the three recipes scored together: one call per corpus
    assert len(evals) == len(QUICK.corpora) and all(len(c[1 : c.index("--corpus")]) == 3 and c[-2:] == ["--reference", "smollm2"] for c in evals)


def test_a_batch_too_large_for_memory_is_scored_in_groups_that_fit(tmp_path, monkeypatch):
    """Four models made from SmolLM2 with room for two beside the reference: two `lowbit
    eval`s per corpus of two models each, every model's scores in order; with room for none
    beside it, one model at a time (which `lowbit eval` streams), never a refusal."""
    import lowbit.system
    from lowbit.loader import open_skeleton
    from lowbit.streaming import float_weight_bytes, in_memory_eval_peak

    skeleton = open_skeleton("smollm2").model
    one = float_weight_bytes(skeleton) * 5 // 4
    assert float_weight_bytes(skeleton) // 4 == 134_515_008  # the tied head counted once
    cap = in_memory_eval_peak([skeleton] * 3) + one // 2  # the reference and two models, not three
    calls = []

    def fake_lowbit(argv, log):
        calls.append(argv)
        scored = argv[1 : argv.index("--corpus")]
        results = [{"perplexity": 10.0}] + [{"perplexity": float(m[-1]), "kld": 0.1, "top1_percent": 90.0, "bits_per_weight": 4.0,
                                             "model_bytes": 1} for m in scored]
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"results": results}))
        return {"seconds": 5.0, "peak_rss_mb": 100, "output": ""}

    monkeypatch.setattr(compression, "_lowbit", fake_lowbit)
    monkeypatch.setattr(lowbit.system, "available_memory", lambda: cap)
    made = [f"made{i}" for i in range(1, 5)]
    scores = compression.score(made, "smollm2", QUICK, tmp_path)
    assert [len(c[1 : c.index("--corpus")]) for c in calls] == [2] * 2 * len(QUICK.corpora)
    assert [s[QUICK.corpora[0]]["perplexity"] for s in scores] == [1.0, 2.0, 3.0, 4.0]
    assert all(c[-2:] == ["--reference", "smollm2"] for c in calls)
    calls.clear()
    monkeypatch.setattr(lowbit.system, "available_memory", lambda: one)
    assert len(compression.score(made, "smollm2", QUICK, tmp_path / "alone")) == 4
    assert [len(c[1 : c.index("--corpus")]) for c in calls] == [1] * 4 * len(QUICK.corpora)


def test_a_steps_peak_is_its_own_not_the_larger_reports(tmp_path):
    """The report process holds 1.5 GB; a step it starts (`lowbit methods`, a few hundred MB)
    is recorded at its own peak. The kernel's count (wait4) said 1.5 GB: a forked child
    inherits its parent's high-water mark."""
    held = bytearray(1536 * 2**20)
    held[:: 4096] = b"\x01" * len(held[:: 4096])  # touched: resident, not only reserved
    run = compression._lowbit(["methods"], tmp_path / "methods.log")
    assert "gptq" in run["output"] and 10 < run["peak_rss_mb"] < 1000
    del held


def test_rows_cached_before_steps_kept_their_own_peaks_show_a_bound():
    from lowbit.reports.tables import peak

    old = row("PTQ", 11.0)
    assert peak(old) == "≤ 100" and peak({**old, "peak_rss_own": True}) == "100" and peak({**old, "peak_rss_mb": None}) == "-"
    results = synthetic()
    assert "a bound rather than the step's peak" in markdown([results], {}, "lowbit report")
    for r in results.rows.values():
        r["peak_rss_own"] = True
    assert "a bound rather" not in markdown([results], {}, "lowbit report")


@pytest.fixture(scope="module")
def wide_tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny128")
    tiny_llama(hidden=128, intermediate=256).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_a_quick_report_runs_end_to_end_and_a_second_reuses_the_cache(wide_tiny_dir, tmp_path, capsys):
    argv = ["report", "--models", str(wide_tiny_dir), "--quick", "--recipes", "rtn W4 g128", "wanda 2:4", "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert "3 rows, 3 to measure" in capsys.readouterr().out
    report = (tmp_path / "one" / "report.md").read_text()
    assert "### Table 9.3" in report and "Structured pruning" in report and "wanda 2:4" in report
    assert (tmp_path / "one" / "report.html").exists() and len(list((tmp_path / "one").glob("*.png"))) == 3
    cached = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert set(cached["rows"]) == {"float", "rtn W4 g128", "wanda 2:4"}
    assert cached["rows"]["wanda 2:4"]["scores"]["pydoc"]["bits_per_weight"] == pytest.approx(9.0)
    assert main([*argv, "--out", str(tmp_path / "two")]) == 0
    assert "3 rows, 0 to measure" in capsys.readouterr().out
    assert (tmp_path / "two" / "report.md").read_text().replace("two", "one") == report


def test_report_refuses_an_unknown_recipe_in_one_line(capsys, tmp_path):
    assert main(["report", "--recipes", "gptq W5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gptq W5 unknown" in err[0]
    assert not (tmp_path / "r").exists()
