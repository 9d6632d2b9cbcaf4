"""What users see in the report (issue 22): runs named as people say them, each scan's own k and ε,
no "−0.0 %", legends beside the data, the dynamics of loss and task score, one mitigation section
per adapter with a λ axis, the sweeps' ρ and scatter, and the page in headless Chromium at 1,400 px.

The slow tests use real stores made by the experiment machinery on a tiny random BERT
(tests/report_inputs.py): sweeps (k = 4, ε = 0.5), an intervention λ sweep (k = 6, ε = 0.6), tracking.
"""

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import report_inputs
from test_report import CHROMIUM_FLAGS, LORA_INTRUDERS, chromium, images, make_scan

from lorascope.report import build_report, figures, load, tables
from lorascope.report.html import _cell
from lorascope.report.labels import method_name, sci, unit_name
from lorascope.report.loader import Record, Run

# ------------------------------------------------------------------------------------------- fast


def test_runs_are_named_as_people_say_them():
    assert method_name({"method": "lora", "rank": 1, "alpha": 2.0, "lr": 0.01}) == "LoRA r=1 (α=2, η=1e-2)"
    assert method_name({"method": "full", "lr": 5e-5}) == "full fine-tuning (η=5e-5)"
    assert method_name({"method": "lora", "rank": 8, "alpha": 16.0, "rslora": True}) == "rsLoRA r=8 (α=16)"
    assert [sci(x) for x in (2.4e-3, 1e-4, 0.5, 3.0)] == ["2.4e-3", "1e-4", "0.5", "3"]
    unit = {"method": "lora", "rank": 4, "alpha": 8.0, "lr": 0.02, "task": "sst2", "lam": 0.5,
            "control": "neighbour"}
    assert unit_name(unit, ["task", "lam", "control"]) == \
        "LoRA r=4 (α=8, η=2e-2) on sst2, λ = 0.5, neighbour control"


def test_no_negative_zero():
    assert tables._pct(-1e-4) == "0.0 %" and tables._pct(-0.04) == "0.0 %" and tables._pct(4.0) == "+4.0 %"
    assert str(tables.pct_change(4.9, 4.9)) == "0.0" and tables.pct_change(-1.0, -1.0) == 0.0
    assert _cell(-0.0)[0] == "0"


def two_scans(tmp_path: Path) -> list[Run]:
    """The same planted scan at ε = 0.5 and at ε = 0.9 (the summary re-counts intruders at each ε)."""
    make_scan(1, LORA_INTRUDERS, 8).save(tmp_path / "a")
    b = make_scan(2, {}, 48)
    replace(b, settings={**b.settings, "epsilon": 0.9}).save(tmp_path / "b")
    return load(tmp_path).runs


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_captions_and_legends_name_each_scans_settings(tmp_path):
    runs = two_scans(tmp_path)
    assert [(r.summary["epsilon"], r.summary["k"]) for r in runs] == [(0.5, 10), (0.9, 10)]
    eps = figures.epsilon_curves(runs)
    assert "each scan's own" not in eps.caption and "k = 10" in eps.caption
    assert "ε = 0.5, 0.9" in eps.caption
    legend = [t.get_text() for t in eps.figure.legends[0].get_texts()]
    assert legend == ["a (ε = 0.5, k = 10)", "b (ε = 0.9, k = 10)"]
    assert "each scan's own ε" in figures.k_curves(runs).caption
    head = tables.headline(load(tmp_path))[0]
    assert "a: 6 intruder dimensions in 3 of 6 matrices at ε = 0.5, k = 10" in head
    assert "each scan's own ε and k" in head


def test_legends_sit_beside_the_data(tmp_path):
    runs = two_scans(tmp_path)
    for plot in (figures.epsilon_curves(runs), figures.k_curves(runs), figures.per_module_type(runs),
                 figures.per_layer(runs), figures.delta_spectra(runs)):
        fig = plot.figure
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert not any(ax.legend_ for ax in fig.axes), plot.name
        for ax in fig.axes:
            assert not _overlaps(box, ax.get_window_extent(renderer)), plot.name
        assert box.x1 <= fig.bbox.x1 + 1, plot.name  # and inside the picture


def test_dynamics_plots_loss_and_task_score():
    track = [Record(unit={"run": "r"}, metrics={"n_intruders": n, "train_loss": loss, "task_score": acc,
                                                "scan_seconds": 0.1}, step=s)
             for s, n, loss, acc in [(0, 0, None, 0.5), (5, 3, 0.7, 0.6), (10, 5, 0.5, 0.8)]]
    plot = figures.dynamics(track)
    axes = plot.figure.axes
    assert [ax.get_ylabel() for ax in axes] == ["intruder dimensions", "training loss", "task score"]
    assert [list(ax.get_lines()[0].get_ydata()) for ax in axes] == [[0, 3, 5], [0.7, 0.5], [0.5, 0.6, 0.8]]
    assert "scan_seconds" not in plot.caption


# ------------------------------------------------------------------------------------------- real stores


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return report_inputs.build(tmp_path_factory.mktemp("report_inputs"))
    finally:
        torch.set_num_threads(threads)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_tracker_logs_training_loss_and_task_score(results):
    (record,) = lines(results / "tracking" / "records.jsonl")
    track = lines(results / "tracking" / record["paths"]["tracking"])
    assert "train_loss" not in track[0]["metrics"]  # step 0: before any update
    # the final point scores the saved model: the number training reported
    assert track[-1]["metrics"]["task_score"] == pytest.approx(record["metrics"]["test_accuracy"], abs=1e-12)
    run = json.loads((results / "tracking" / record["paths"]["run"] / "run.json").read_text())
    steps = [x["step"] for x in track]
    per_epoch = run["history"]["steps"] // len(run["history"]["epoch_loss"])
    weighted = sum(x["metrics"]["train_loss"] * (s - p)
                   for x, s, p in zip(track[1:], steps[1:], steps[:-1], strict=True))
    assert weighted == pytest.approx(per_epoch * sum(run["history"]["epoch_loss"]), rel=1e-9)


@pytest.mark.slow
def test_real_stores_report(results, tmp_path):
    data = load(results)
    k_eps = {(r.summary["k"], r.summary["epsilon"]) for r in data.runs}
    assert k_eps == {(4, 0.5), (6, 0.6)}
    # one mitigation section for the 3 λ × 2 controls of the one adapter, named by its run
    (group,) = tables.mitigation_groups(data.mitigations)
    assert len(group.items) == 2 * len(report_inputs.LAMS)
    assert group.label == "LoRA r=4 (α=8, η=2e-2)"
    sweep = tables.mitigation_sweep_table(group, 0)
    rows = [dict(zip(sweep.columns, r, strict=True)) for r in sweep.rows]
    assert all(r["directions rescaled"] == 0 and r["matrices changed"] == 0 for r in rows if r["λ"] == 1.0)
    assert all(r["directions rescaled"] == r["directions selected"] > 0 for r in rows if r["λ"] != 1.0)
    lam0 = next(r for r in rows if r["λ"] == 0.0 and r["control"] == "intruder")
    rec = next(x for x in lines(results / "intervention" / "records.jsonl")
               if x["unit"].get("lam") == 0.0 and x["unit"]["control"] == "intruder")
    assert lam0["intruders left"] == rec["metrics"]["n_intruders"] < group.items[-1].summary["n_intruders"]

    out = build_report(results, tmp_path / "report.html", png_dir=tmp_path / "png")
    html = out.read_text()
    assert "-0.0 %" not in html and "−0.0" not in html
    assert html.count('<section id="mitigation-') == 1 and "units/" not in re.sub(r"<pre>.*?</pre>|<code>.*?</code>"
                                                                                 r"|<p class=\"note\">.*?</p>", "",
                                                                                 html, flags=re.S)
    heads = re.search(r'<section class="headline".*?</section>', html, re.S).group(0)
    rho = json.loads((results / "sweeps" / "summary.json").read_text())["spearman"][0]
    assert rho["axis"] == "all"
    assert f"Spearman ρ between intruders and forgetting {rho['spearman_intruders_forgetting']:.2f} over 4" in heads
    assert "λ = 1 leaves the weights unchanged" in heads and "rescaled in 12 of 12" in heads
    names = {p.stem for p in (tmp_path / "png").glob("*.png")}
    assert {"intruders_vs_forgetting", "mitigation_lambda_0", "mitigation_0", "dynamics", "lambda_tradeoff"} <= names
    scatter = figures.sweep_scatter(data)
    (points,) = [c for c in scatter.figure.axes[0].collections]
    sweep_recs = lines(results / "sweeps" / "records.jsonl")
    assert sorted(map(tuple, points.get_offsets().tolist())) == \
        sorted((r["metrics"]["n_intruders"], r["metrics"]["forgetting"]) for r in sweep_recs)
    lam_plot = figures.lam_tradeoff(data.records)
    colours = [tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
               for line in lam_plot.figure.axes[0].get_lines()]
    assert len(colours) == 2 and len(set(colours)) == 2  # the two controls in two colours
    metric = next(r.metrics["forgetting_metric"] for r in data.records if r.metrics.get("forgetting_metric"))
    assert lam_plot.figure.axes[0].get_xlabel() == f"forgetting ({metric})"  # the axis names its metric
    dyn = figures.dynamics(data.tracking)
    assert [ax.get_ylabel() for ax in dyn.figure.axes] == ["intruder dimensions", "training loss", "task score"]


PROBE = """<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    var figs = Array.prototype.map.call(document.querySelectorAll("figure"), function (f) {
      var img = f.querySelector("img"), src = img ? img.getAttribute("src") : "";
      return {id: f.id, img: !!img, bytes: src.length - src.indexOf(",") - 1,
              width: img ? img.naturalWidth : 0, caption: (f.querySelector("figcaption") || {}).textContent};
    });
    var boxes = Array.prototype.map.call(document.querySelectorAll("div.scroll"), function (box) {
      var t = box.querySelector("table"), r = box.getBoundingClientRect(), s = box.closest("section");
      var hint = box.previousElementSibling;
      return {id: t.id, right: r.right, section: s.getBoundingClientRect().right,
              overflow: getComputedStyle(box).overflowX,
              wide: t.getBoundingClientRect().width > r.width + 1, scrolls: box.getAttribute("data-scrolls"),
              hint: hint && hint.classList.contains("scroll-hint") ? getComputedStyle(hint).display : "none"};
    });
    var probe = document.createElement("pre");
    probe.id = "lorascope-probe";
    probe.textContent = JSON.stringify({figs: figs, boxes: boxes, inner: window.innerWidth,
                                        doc: document.documentElement.scrollWidth});
    document.body.appendChild(probe);
  }, 50);
});
</script>"""


@pytest.mark.slow
def test_page_in_headless_chromium_at_1400px(results, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (install it with: apt-get install -y chromium)")
    page = build_report(results, tmp_path / "report.html")
    html = page.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("<head>", "<head>\n" + PROBE, 1))
    profile = ["--user-data-dir=" + str(tmp_path / "profile"), "--window-size=1400,2000"]
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, *profile, "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="lorascope-probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page did not finish loading in chromium:\n{dom.stderr[-3000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))
    assert seen["inner"] == 1400

    # every figure has an <img> with data that decodes to a picture
    assert len(seen["figs"]) == len(images(html)) >= 10
    assert all(f["img"] and f["bytes"] > 1000 and f["width"] > 0 for f in seen["figs"]), seen["figs"]

    # captions name the k and ε of their own scan
    data = load(results)
    maps = {f["id"]: f["caption"] for f in seen["figs"] if f["id"].startswith("fig-similarity_")}
    runs = [r for r in data.runs if r.result is not None][: figures.MAX_MAP_RUNS]
    assert len(maps) == len(runs)
    ks = set()
    for i, run in enumerate(runs):
        caption = maps[f"fig-similarity_{i}"]
        assert caption.startswith(run.label)
        assert f"top-{run.result.k} tuned" in caption and f"ε = {run.result.epsilon} " in caption
        ks.add(run.result.k)
    assert ks == {4, 6}
    eps_caption = next(f["caption"] for f in seen["figs"] if f["id"] == "fig-intruders_vs_epsilon")
    assert "each scan's own k" in eps_caption and "ε = 0.5, 0.6" in eps_caption

    # no table spills out of its box, the page never scrolls sideways, and a wide table says it scrolls
    assert seen["doc"] <= seen["inner"]
    for b in seen["boxes"]:
        assert b["right"] <= min(b["section"], seen["inner"]) + 0.5, b
        assert b["overflow"] == "auto", b
        assert (b["scrolls"] == "true") == b["wide"] and (b["hint"] == "block") == b["wide"], b
    assert any(b["wide"] for b in seen["boxes"])  # the experiment records table is wider than 1,400 px

    shot = tmp_path / "report.png"
    run = subprocess.run([browser, *CHROMIUM_FLAGS, *profile, f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.read_bytes().startswith(b"\x89PNG"), run.stderr[-3000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] == 1400
        assert np.asarray(im.convert("L")).std() > 5  # a drawn page, not a blank one
