"""mm.eval.report: loss and gate plots from the stages' metrics.jsonl, the benchmark table, examples; corrupt lines skipped."""
from __future__ import annotations

import json

import pytest

from mm.eval.report import read_metrics, series, write_report


def _metrics(d, recs, junk=False):
    d.mkdir(parents=True)
    lines = [json.dumps(r) for r in recs] + (["{not json", "[1, 2]"] if junk else [])
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_report_plots_table_and_examples(tmp_path):
    a, b, c = tmp_path / "lm", tmp_path / "img", tmp_path / "empty"
    _metrics(a, [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 6)] + [{"step": 5, "val_bpb": 2.0}], junk=True)
    _metrics(b, [{"step": s, "loss": 3.0, "gate_image/1.attn": 0.01 * s, "gate_image/1.ffn": -0.02 * s}
                 for s in range(1, 4)])
    c.mkdir()
    (a / "result.json").write_text(json.dumps({"run_s": 12.5, "peak_rss_mb": 900.0}))
    (b / "result.json").write_text(json.dumps({"run_s": 30.0, "peak_rss_mb": 1500.25, "child_peak_rss_mb": 700.0}))
    (c / "result.json").write_text("{truncated")
    assert len(read_metrics(a)) == 6 and read_metrics(c) == []
    assert series(read_metrics(a), "loss") == ([1, 2, 3, 4, 5], [4.9, 4.8, 4.7, 4.6, 4.5])
    assert series(read_metrics(b), "gate_image/1.ffn")[1] == [-0.02, -0.04, -0.06]
    rows = [{"modality": "image", "metric": "vqa_acc", "model": 0.2875, "baseline": 0.0, "baseline_name": "blind"},
            {"modality": "image", "metric": "vqa_acc vs another image", "model": 0.2875, "baseline": 0.25,
             "baseline_name": "shuffled image", "gain_ci95": [-0.01, 0.085], "beats": False}]
    reading = [{"group": "mnist", "items": 20, "acc": 0.5, "shuffled": 0.1, "blind": 0.1, "gain": 0.4,
                "gain_ci95": [0.2, 0.6]}]
    ex = [{"modality": "image", "input": "examples/cat.png", "prompt": "What is shown?", "output": "cat",
           "reference": "cat"}]
    path = write_report(tmp_path, {"lm": a, "img": b, "empty": c}, rows, ex, notes=["2 cores"],
                        tables=[("Image reading by source", reading, ["group", "items", "acc", "shuffled", "blind",
                                                                       "gain", "gain_ci95"])])
    text = path.read_text()
    assert (tmp_path / "plots" / "losses.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "gates.png").stat().st_size > 1000
    assert "| image | vqa_acc | 0.287 | 0.000 | blind |  |  |" in text
    assert "| image | vqa_acc vs another image | 0.287 | 0.250 | shuffled image | [-0.010, +0.085] | False |" in text
    assert "## Image reading by source" in text and "| mnist | 20 | 0.500 | 0.100 | 0.100 | 0.400 | [+0.200, +0.600] |" \
        in text
    # the stage table: each stage's recorded cost (none for an unreadable result), then the total and largest peak
    assert f"| lm | 12.500 | 900.000 |  | {a} |" in text and f"| img | 30.000 | 1500.250 | 700.000 | {b} |" in text
    assert f"| empty |  |  |  | {c} |" in text and "| total | 42.500 | 1500.250 |  |  |" in text
    assert "![input](examples/cat.png)" in text and "**cat**" in text and "- 2 cores" in text
    # no gates logged anywhere: no gate plot, and the report says so
    path = write_report(tmp_path / "r2", {"lm": a}, [], [])
    assert not (tmp_path / "r2" / "plots" / "gates.png").exists() and "no stage logged gate values" in path.read_text()


def test_row_beats_only_when_its_interval_excludes_the_control():
    from mm.stages.herd_report import row

    assert row("v", "acc", 0.4, 0.3, "frame", ci=[0.02, 0.18])["beats"] is True
    assert row("v", "acc", 0.4, 0.3, "frame", ci=[-0.01, 0.21])["beats"] is False  # better, but inside the noise
    assert row("s", "wer", 0.5, 0.9, "blind", lower_is_better=True, ci=[-0.5, -0.3])["beats"] is True
    assert row("s", "wer", 0.5, 0.9, "blind", lower_is_better=True, ci=[-0.5, 0.1])["beats"] is False
    plain = row("t", "bpb", 2.0, 3.0, "unigram", lower_is_better=True)  # no item pairing: the point comparison
    assert plain["beats"] is True and "gain_ci95" not in plain


def test_failed_benchmark_is_one_error_line_and_nothing_kept(tmp_path):
    """A benchmark that fails (here: no such run) raises with the script and its own error line; no JSON is kept."""
    import pytest

    from mm.stages.herd_report import BenchmarkError, run_benchmark

    out = tmp_path / "bench" / "image.json"
    with pytest.raises(BenchmarkError) as err:
        run_benchmark("image.py", ["--ckpt", str(tmp_path / "no_run")], out, threads=1)
    msg = str(err.value)
    assert msg.startswith("benchmarks/image.py --ckpt") and str(tmp_path / "no_run") in msg.split(": ", 1)[1]
    assert "\n" not in msg and not out.exists()


def test_reading_tables_from_the_image_benchmark(tmp_path):
    """The report's image tables: by family, by source and the naming questions by source, each when present, in that
    order; none without the benchmark's file."""
    from mm.stages.herd_report import reading_tables

    row = {"items": 4, "acc": 0.5, "shuffled": 0.25, "blind": 0.0, "gain": 0.25, "gain_ci95": [0.0, 0.5]}
    f = tmp_path / "image.json"
    assert reading_tables(f) == []
    f.write_text(json.dumps({"reading_by_source": {"mnist": row}, "naming_by_source": {"all": row, "mnist": row}}))
    tabs = reading_tables(f)
    assert [t[0] for t in tabs] == ["Image reading by source", "Image naming questions (the label in words) by source"]
    assert [r["group"] for r in tabs[1][1]] == ["all", "mnist"] and tabs[1][1][1]["gain"] == 0.25


def test_chat_rows_pair_the_same_items_with_the_pretrained_lm(tmp_path):
    """The chat rows from the text benchmark's files: exact match paired item by item with the pretrained LM's (a
    gain inside the noise does not beat it), chosen_frac against chance through its interval."""
    from mm.config import HerdReportConfig
    from mm.stages.herd_report import text_rows

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "text_lm.json").write_text(json.dumps({"val_bpb": 2.0, "unigram_bpb": 3.0,
                                                     "vs_unigram_ci95": [-1.1, -0.9]}))
    base = [0.0] * 20
    (bench / "chat_pretrained.json").write_text(json.dumps({"exact_match": {"overall": 0.0},
                                                            "exact_match_items": base}))
    (bench / "chat.json").write_text(json.dumps({"exact_match": {"overall": 0.5}, "exact_match_items": [1.0, 0.0] * 10,
                                                 "chosen_frac": 0.55, "chosen_frac_ci95": [0.45, 0.65]}))
    rows, _ = text_rows(HerdReportConfig(lm="x", chat="y"), bench)
    assert rows[0]["gain_ci95"] == [-1.1, -0.9] and rows[0]["beats"] is True  # lower bits per byte
    em, cf = rows[1], rows[2]
    assert em["metric"] == "exact_match" and em["gain_ci95"][0] > 0 and em["beats"] is True
    assert cf["gain_ci95"] == pytest.approx([-0.05, 0.15]) and cf["beats"] is False  # above 0.5, inside the noise
    (bench / "chat.json").write_text(json.dumps({"exact_match": {"overall": 0.05},
                                                 "exact_match_items": [1.0] + [0.0] * 19}))
    em = text_rows(HerdReportConfig(lm="x", chat="y"), bench)[0][1]
    assert em["model"] > em["baseline"] and em["gain_ci95"][0] <= 0 and em["beats"] is False


def test_human_speech_rows_pair_blind_and_peers(tmp_path):
    """The recorded-speech rows from the speech benchmark's file: all prompts and each tagged subset against the
    blind model through their intervals; a peer beside ours paired, a peer not installed here named as such."""
    from mm.config import HerdReportConfig
    from mm.stages import herd_report

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "speech_human.json").write_text(json.dumps({
        "items": 567, "wer": 0.55, "blind_wer": 1.0, "wer_vs_blind": {"ci95": [-0.5, -0.4]},
        "wer_by_tag": {"letters_only": 0.5}, "blind_wer_by_tag": {"letters_only": 1.0},
        "wer_vs_blind_by_tag": {"letters_only": {"ci95": [-0.6, 0.01]}},
        "peers": {"moonshine": {"wer": 0.04, "ours": 0.55, "ci95": [0.45, 0.56]},
                  "pocketsphinx": {"name": "pocketsphinx", "error": "pocketsphinx is not installed"}}}))
    rows = herd_report.human_speech_rows(HerdReportConfig(lm="x", speech="s", asr_peers=["moonshine"]), bench)
    assert [r["metric"] for r in rows] == ["human wer (567)", "human wer, letters_only", "human wer", "human wer"]
    assert rows[0]["beats"] is True and rows[1]["beats"] is False  # lower, but the subset's interval reaches 0
    assert rows[2]["baseline_name"] == "ASR peer moonshine" and rows[2]["gain_ci95"] == [0.45, 0.56]
    assert rows[2]["ref"] == "peer" and rows[2]["beats"] is None  # a peer is a reference, not a control to beat
    assert rows[3]["model"] is None and "not installed" in rows[3]["baseline_name"] and rows[3]["ref"] == "peer"
    assert not rows[0].get("ref") and not rows[1].get("ref")


def test_reference_rows_get_their_own_tables_and_count_in_no_beats(tmp_path, monkeypatch):
    """herd_report.run: a peer row (an OCR / ASR tool beside ours) and a ceiling row (the LM given the typed
    transcript) go to their own tables, not to the benchmark table, and neither the "N of M rows beat" line nor
    beats_all counts them; an unknown reference kind is refused."""
    from mm.config import HerdReportConfig
    from mm.stages import herd_report

    control = herd_report.row("image", "vqa_acc vs another image", 0.4, 0.2, "shuffled image", ci=[0.1, 0.3])
    peer = herd_report.row("image", "ocr items (23)", 0.35, 1.0, "OCR peer rapidocr", ci=[-0.8, -0.4], ref="peer")
    ceiling = herd_report.row("speech", "wer", 1.27, 1.25, "the frozen LM given the typed transcript",
                              lower_is_better=True, ref="ceiling")
    monkeypatch.setattr(herd_report, "text_rows", lambda cfg, bench: ([control, peer, ceiling], []))
    (tmp_path / "lm").mkdir()
    res = herd_report.run(HerdReportConfig(lm=str(tmp_path / "lm")), tmp_path / "report")
    assert res["rows"] == [control] and res["peer"] == [peer] and res["ceiling"] == [ceiling]
    assert res["beats_all"] is True and peer["beats"] is None and ceiling["beats"] is None
    md = (tmp_path / "report" / "report.md").read_text()
    assert "1 of 1 benchmark rows beat their baseline" in md
    bench, rest = md.split("## Peers")
    assert "OCR peer rapidocr" not in bench and "typed transcript" not in bench
    peers, ceilings = rest.split("## Ceilings")
    assert "OCR peer rapidocr" in peers and "typed transcript" in ceilings.split("##")[0]
    with pytest.raises(ValueError, match="row ref 'judge' unknown"):
        herd_report.row("chat", "x", 0.5, 0.5, "y", ref="judge")
