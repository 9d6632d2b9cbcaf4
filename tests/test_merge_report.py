"""The report of a merge: a tiny `lorascope merge --scan` (TIES, and EMR with one output per input), the
report over its folder and over its merge.json alone, `lorascope scan BASE OUT` afterwards, and a merge
study store's section. Every number shown is checked against merge.json, the scans or summary.json."""

import html as htmllib
import json
import re

import numpy as np
import pytest
from test_merge import make_lora, tiny_bert
from test_report import images
from typer.testing import CliRunner

from lorascope.cli import app
from lorascope.errors import InputError
from lorascope.report import build_report, load, merges
from lorascope.report.labels import merge_name, unit_name
from lorascope.schema import MergeResult, ScanResult

runner = CliRunner()
INPUTS = ["a0", "a1", "a2"]


def cli(*args: str) -> None:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """ROOT/base, three LoRAs, their TIES merge (ROOT/ties) and EMR merge (ROOT/emr), both with --scan."""
    root = tmp_path_factory.mktemp("merge_report")
    base = tiny_bert()
    base.save_pretrained(root / "base")
    for i, name in enumerate(INPUTS):
        make_lora(base, root / name, seed=10 + i)
    adapters = [str(root / a) for a in INPUTS]
    cli("merge", str(root / "base"), *adapters, "--method", "ties", "--scan", "--out", str(root / "ties"))
    cli("merge", str(root / "base"), *adapters, "--method", "emr", "--scan", "--out", str(root / "emr"))
    return root


@pytest.fixture(scope="module")
def ties_page(tiny) -> str:
    return build_report(tiny / "ties", tiny / "ties.html").read_text()


def section(page: str, id_: str) -> str:
    found = re.search(rf'<section id="{re.escape(id_)}">(.*?)</section>', page, re.S)
    assert found, f"no section {id_}"
    return found.group(1)


def table(page: str, id_: str) -> tuple[list[str], list[list[str]]]:
    """(column titles, rows of each cell's raw value) of the report table ``id_``."""
    body = re.search(rf'<table class="sortable" id="table-{re.escape(id_)}">(.*?)</table>', page, re.S).group(1)
    columns = [htmllib.unescape(c) for c in re.findall(r"<th>(.*?)</th>", body)]
    rows = [[htmllib.unescape(v) for v in re.findall(r'data-sort="([^"]*)"', tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>")[1], re.S)]
    return columns, rows


def test_merge_section_counts_equal_merge_json(tiny, ties_page):
    result = MergeResult.load(tiny / "ties")
    a = result.analysis
    body = section(ties_page, "merge-0")
    assert "Merge: TIES of a0, a1, a2" in body
    pngs = images(body)  # the bars, the attribution map, the maps of the merge and of each input
    assert len(pngs) == 2 + 1 + len(INPUTS)
    assert all(p.startswith(b"\x89PNG") and len(p) > 2000 for p in pngs)
    columns, rows = table(ties_page, "merge-attribution-0")
    by = {r[0]: r for r in rows}
    for t in INPUTS:
        assert int(by[t][1]) == a["intruders"]["inputs"][t] and int(by[t][2]) == a["attributed_to"][t]
    assert int(by["merge"][1]) == a["intruders"]["outputs"]["merge"] == result.summary()["n_merged_intruders"]
    assert int(by["new (close to no input)"][2]) == a["new_directions"]
    # every merged intruder is listed with merge.json's numbers
    columns, rows = table(ties_page, "merge-intruders-0")
    stored = [(m.name, x) for m in result.matrices for x in m.intruders]
    assert len(rows) == len(stored) == a["intruders"]["outputs"]["merge"]
    for row, (name, x) in zip(rows, stored, strict=True):
        assert row[1] == name and int(row[2]) == x.index
        assert [float(v) for v in row[3:3 + 1 + len(INPUTS)]] == [x.max_cos, *x.input_max_cos]
    attributed = [r[-1] for r in rows]
    assert {t: attributed.count(t) for t in INPUTS} == a["attributed_to"]
    # the merges table: one row, its counts those of merge.json
    columns, (row,) = table(ties_page, "merges")
    cell = dict(zip(columns, row, strict=True))
    assert int(cell["intruders (merge)"]) == a["intruders"]["outputs"]["merge"]
    assert int(cell["intruders (inputs, sum)"]) == sum(a["intruders"]["inputs"].values())
    assert int(cell["written bytes"]) == result.output["storage"]["written_bytes"]
    assert float(cell["max rel. error of written W"]) == result.summary()["max_rel_error"]
    # the headline says the same
    assert (f"{a['intruders']['outputs']['merge']} intruder dimensions in the merge against a0 "
            f"{a['intruders']['inputs']['a0']}") in ties_page


def test_merge_scans_are_named_after_the_merge_and_not_drawn_twice(tiny, ties_page):
    assert 'id="similarity"' not in ties_page  # the general maps would repeat the merge section's
    labels = {r.label for r in load(tiny / "ties").runs}
    assert labels == {"TIES merge", "input a0", "input a1", "input a2"}
    _, rows = table(ties_page, "scans")
    assert {r[0] for r in rows} == labels


def test_figures_hold_merge_json_numbers(tiny):
    (g,) = load(tiny / "ties").merges
    a = g.analysis
    bars = merges.intruder_bars(g, 0).figure.axes
    assert [p.get_height() for p in bars[0].patches] == [*a["intruders"]["inputs"].values(),
                                                           *a["intruders"]["outputs"].values()]
    assert [p.get_height() for p in bars[1].patches] == [*a["attributed_to"].values(), a["new_directions"]]
    heat = merges.attribution_map(g, 0).figure.axes[0]
    stored = np.array([x.input_max_cos for m in g.result.matrices for x in m.intruders])
    assert len(stored) <= merges.MAX_ATTRIBUTION_ROWS
    np.testing.assert_array_equal(heat.images[0].get_array(), stored)
    dots = [line.get_xydata()[0] for line in heat.get_lines()]  # one per intruder attributed to an input
    assert len(dots) == sum(a["attributed_to"].values())
    for x, y in dots:
        assert stored[int(y)].argmax() == int(x) and stored[int(y), int(x)] >= a["epsilon"]
    # the maps: the merge first, then the inputs, on the same matrices (the most merged intruders first)
    maps = merges.merge_maps(g, None, 2, 0)
    assert [p.title for p in maps] == [f"Similarity map: {x}" for x in ("TIES merge", "input a0", "input a1",
                                                                         "input a2")]
    first = max(g.result.matrices, key=lambda m: len(m.intruders)).name
    assert all(p.figure.axes[0].get_title().startswith(first.removesuffix(".weight").split("layer.")[1])
               for p in maps)


def test_report_of_merge_json_alone_reads_its_scans(tiny):
    data = load(tiny / "emr" / "merge.json")  # a file: the scans it names are read too
    (g,) = data.merges
    assert set(g.outputs) == set(g.inputs) == set(INPUTS)
    assert g.outputs["a1"].label == "EMR merge for a1" and g.inputs["a1"].label == "input a1"
    for t in INPUTS:
        assert g.outputs[t].stats["n_intruders"] == g.analysis["intruders"]["outputs"][t]
    bars = merges.intruder_bars(g, 0).figure.axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == [*INPUTS, *(f"merge for {t}" for t in INPUTS)]
    rows = merges.intruder_table(g, 0).rows
    assert {r[0] for r in rows} == set(INPUTS)
    assert len(rows) == sum(g.analysis["intruders"]["outputs"].values())


def test_scan_afterwards_on_the_merged_adapter(tiny):
    """`lorascope scan BASE OUT` reads OUT as the PEFT adapter it is (merge.json and scans/ beside it) and
    finds what merge --scan found; an EMR folder scans as its one adapter per input."""
    cli("scan", str(tiny / "base"), str(tiny / "ties"), "--out", str(tiny / "rescan"))
    again, during = ScanResult.load(tiny / "rescan"), ScanResult.load(tiny / "ties" / "scans" / "output-merge")
    analysis = MergeResult.load(tiny / "ties").analysis
    assert again.summary()["sides"]["left"]["n_intruders"] == analysis["intruders"]["outputs"]["merge"]
    assert [m.name for m in again.matrices] == [m.name for m in during.matrices]
    for m, d in zip(again.matrices, during.matrices, strict=True):
        np.testing.assert_allclose(m.max_cos, d.max_cos, atol=1e-6)
    cli("scan", str(tiny / "base"), str(tiny / "emr"), "--out", str(tiny / "rescan_emr"))
    emr = MergeResult.load(tiny / "emr").analysis
    for t in INPUTS:
        n = ScanResult.load(tiny / "rescan_emr" / t).summary()["sides"]["left"]["n_intruders"]
        assert n == emr["intruders"]["outputs"][t]


def test_bad_merge_analysis_fails_clearly(tiny, tmp_path):
    d = json.loads((tiny / "ties" / "merge.json").read_text())
    d["analysis"]["attributed_to"]["a0"] = "many"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "merge.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"merge.json: analysis.attributed_to"):
        load(tmp_path / "bad")
    d = json.loads((tiny / "ties" / "merge.json").read_text())  # its scans were not copied with it
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "merge.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"analysis.scans names 'scans/output-merge/scan.json'"):
        load(tmp_path / "moved" / "merge.json")


def test_labels_name_merges():
    assert merge_name("knots_ties") == "KnOTS-TIES" and merge_name("ties", 0.5) == "TIES, λ = 0.5"
    unit = {"method": "lora", "rank": 4, "alpha": 8, "lr": 0.02, "task": "sst2+trec", "merge": "dare_ties", "lam": 0.5}
    assert unit_name(unit, ["merge", "lam"]) == "LoRA r=4 (α=8, η=2e-2), DARE-TIES merge, λ = 0.5"


# ------------------------------------------------------------------------------------------ merge study


def test_merge_study_store_renders_its_section(tmp_path, one_thread):
    """The store of tests/test_merge.py::test_merge_study_on_tiny_assets: one row and one point per merge,
    the numbers of summary.json; its λ arm is not taken for a λ sweep of the intervention study."""
    import report_inputs

    report_inputs.merge_study(tmp_path)
    page = build_report(tmp_path / "store", tmp_path / "report.html").read_text()
    body = section(page, "merge-study")
    (png,) = images(body)
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    assert 'id="lambda"' not in page
    columns, rows = table(page, "merge-study")
    got = {r[0]: dict(zip(columns, r, strict=True)) for r in rows}
    summary = json.loads((tmp_path / "store" / "summary.json").read_text())["merges"]
    assert set(got) == {merge_name(m["merge"], m["lam"]) for m in summary} == {"task arithmetic", "EMR",
                                                                                 "TIES, λ = 0.5"}
    for m in summary:
        cell = got[merge_name(m["merge"], m["lam"])]
        assert float(cell["mean task score"]) == m["mean_task_score"]
        assert float(cell["forgetting"]) == m["forgetting"]
        assert float(cell["intruders (merge)"]) == m["n_intruders"]
        assert float(cell["accuracy/topics"]) == m["task_scores"]["accuracy/topics"]
    rows = merges.study_rows(load(tmp_path / "store").records)
    (scatter,) = merges.study_scatter(rows).figure.axes[:1]
    points = sorted(tuple(p) for c in scatter.collections for p in c.get_offsets())
    assert points == sorted((m["forgetting"], m["mean_task_score"]) for m in summary)
    assert sorted(t.get_text() for t in scatter.texts) == sorted(got)
    # the merges it wrote are in the merges table, named like its runs
    columns, rows = table(page, "merges")
    assert len(rows) == 3 and any(r[0].endswith("EMR merge") for r in rows)
