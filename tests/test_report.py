"""lorascope report: builds from each result kind, numbers come from the stored results, the page is
self-contained, and it renders in headless Chromium with no errors and all images loaded."""

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from lorascope.errors import InputError
from lorascope.report import build_report, figures, load, tables
from lorascope.schema import MatrixMitigation, MatrixRecord, MitigationResult, ScaledDirection, ScanResult

N, K, EPS = 48, 10, 0.5
NAMES = [f"encoder.layer.{layer}.{m}.weight" for layer in range(2)
         for m in ("attention.self.query", "attention.self.value", "output.dense")]


# ------------------------------------------------------------------------------------------ fixtures


def planted_record(name: str, rng: np.random.Generator, intruder_rows: list[int], delta_rank: int,
                   side: str = "left") -> MatrixRecord:
    """A record whose numbers come from real vectors: the top-k tuned vectors y_j are base vectors x_j
    with a little noise, except the planted intruder rows, which spread evenly over all base vectors
    (|cos| = 1/√N ≈ 0.14 < ε with every one of them)."""
    X = np.linalg.qr(rng.normal(size=(N, N)))[0]
    Y = np.empty((N, K))
    for j in range(K):
        if j in intruder_rows:
            y = X @ (rng.choice([-1.0, 1.0], size=N) / math.sqrt(N))
        else:
            y = X[:, j] + 0.15 * rng.normal(size=N) / math.sqrt(N)
        Y[:, j] = y / np.linalg.norm(y)
    cos = np.abs(Y.T @ X)  # (k, N)
    dsv = np.sort(rng.uniform(0.1, 1.0, size=delta_rank))[::-1]
    p = dsv / dsv.sum()
    layer = int(name.split(".")[2])
    return MatrixRecord(
        name=name, kind="linear", side=side, shape=[N, N], layer=layer,
        module_type=name.split(".", 3)[3].removesuffix(".weight"),
        singular_values=list(np.linspace(5.0, 1.0, K)), max_cos=list(cos.max(axis=1)),
        best_match=[int(i) for i in cos.argmax(axis=1)],
        n_intruders=int((cos.max(axis=1) < EPS).sum()), similarity=cos[:, :32].tolist(),
        base_singular_values=list(np.linspace(5.0, 0.5, 32)), delta_singular_values=list(dsv),
        delta_effective_rank=float(np.exp(-(p * np.log(p)).sum())),
        delta_stable_rank=float((dsv**2).sum() / dsv[0] ** 2),
        delta_rel_norm=0.05, null_max_cos=0.38, null_max_cos_q99=0.5, exact=True,
    )


def make_scan(seed: int, intruders: dict[str, list[int]], delta_rank: int, both_sides: bool = False,
              command: str = "lorascope scan base tuned --out scan") -> ScanResult:
    rng = np.random.default_rng(seed)
    recs = [planted_record(n, rng, intruders.get(n, []), delta_rank) for n in NAMES]
    if both_sides:
        recs += [planted_record(n, rng, [], delta_rank, side="right") for n in NAMES]
    return ScanResult(settings={"k": K, "epsilon": EPS, "side": "both" if both_sides else "left",
                                "tuned_kind": "lora" if delta_rank < N else "full"},
                      matrices=recs, versions={"python": "3.11", "torch": "9.9.9-test"}, command=command,
                      created="2025-01-01T00:00:00+00:00")


LORA_INTRUDERS = {NAMES[1]: [0, 3], NAMES[4]: [1], NAMES[5]: [0, 1, 2]}  # 6 in 3 of 6 matrices


def write_mitigation(folder: Path) -> MitigationResult:
    """A mitigation.json written by the mitigate module's own dataclasses (its real schema)."""
    mats = []
    for name in NAMES:
        rows = LORA_INTRUDERS.get(name, [])
        dirs = [ScaledDirection("intruder", j, 0.14, 7, 5.0 - 0.4 * j, 0.75 * (5.0 - 0.4 * j)) for j in rows]
        mats.append(MatrixMitigation(name=name, kind="linear", shape=[N, N], source=name,
                                     singular_values=[1.0] * K, max_cos=[0.9] * K, best_match=list(range(K)),
                                     n_intruders=len(rows), directions=dirs,
                                     rel_error=1e-7 if dirs else None))
    res = MitigationResult(settings={"lam": 0.75, "which": "all", "control": None, "epsilon": EPS, "k": K},
                           matrices=mats, versions={"torch": "9.9.9-test"},
                           command="lorascope mitigate base adapter --lam 0.75 --which all --out mitigated")
    res.save(folder)
    return res


LAMS = {0.0: (0.80, 2.00), 0.25: (0.84, 2.10), 0.5: (0.88, 2.20), 0.75: (0.90, 2.35), 1.0: (0.91, 2.50)}
NEIGHBOUR = {0.0: (0.70, 2.60), 0.5: (0.85, 2.55)}
CONTINUAL = [("t1", {"t1": 0.90}, 2.0, 2), ("t2", {"t1": 0.80, "t2": 0.88}, 2.3, 5),
             ("t3", {"t1": 0.70, "t2": 0.81, "t3": 0.86}, 2.6, 9)]
TRACK = [(0, 0, 1.2), (10, 1, 0.9), (20, 3, 0.7), (40, 5, 0.5)]


def summary_of(n_intruders: int) -> dict:
    return {"epsilon": EPS, "k": K, "sides": {"left": {"n_matrices": 6, "n_intruders": n_intruders,
                                                       "matrices_with_intruders": min(n_intruders, 6)}}}


def make_experiment(root: Path) -> Path:
    """runs/lora and runs/full (scan.json), mitigated/ (mitigation.json), a tracking.jsonl and
    records.jsonl with plain units, a λ sweep with the neighbour control, and a continual sequence."""
    make_scan(1, LORA_INTRUDERS, 8, both_sides=True).save(root / "runs" / "lora")
    make_scan(2, {}, N, command="lorascope scan base full --out runs/full").save(root / "runs" / "full")
    write_mitigation(root / "mitigated")
    lines = [
        {"unit": {"method": "lora", "rank": 8, "task": "t1"},
         "metrics": {"accuracy": 0.91, "forgetting": 2.5}, "scan": "runs/lora"},
        {"unit": {"method": "full", "task": "t1"}, "metrics": {"accuracy": 0.93, "forgetting": 3.1},
         "scan": "runs/full/scan.json"},
    ]
    for lam, (acc, forg) in LAMS.items():
        lines.append({"unit": {"method": "lora", "rank": 8, "task": "t1", "lam": lam, "control": None},
                      "metrics": {"accuracy": acc, "forgetting": forg}, "scan": summary_of(int(6 * lam))})
    for lam, (acc, forg) in NEIGHBOUR.items():
        lines.append({"unit": {"method": "lora", "rank": 8, "task": "t1", "lam": lam, "control": "neighbour"},
                      "metrics": {"accuracy": acc, "forgetting": forg}})
    for stage, (task, accs, forg, intr) in enumerate(CONTINUAL):
        lines.append({"unit": {"method": "lora", "rank": 8, "stage": stage, "task": task},
                      "metrics": {**{f"accuracy/{t}": a for t, a in accs.items()}, "forgetting": forg},
                      "scan": summary_of(intr)})
    (root / "records.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    track = [{"step": s, "metrics": {"n_intruders": n, "loss": loss}} for s, n, loss in TRACK]
    (root / "runs" / "lora" / "tracking.jsonl").write_text("\n".join(json.dumps(x) for x in track) + "\n")
    return root


def images(html: str) -> list[bytes]:
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [base64.b64decode(m) for m in found]


def assert_self_contained(html: str) -> None:
    assert not re.search(r"https?://", html)
    for ref in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html):
        assert ref.startswith(("data:", "#")), ref
    assert "<link" not in html and "@import" not in html and "url(" not in html


# ---------------------------------------------------------------------------------------------- scan


def test_scan_report_numbers_images_and_png_dir(tmp_path):
    result = make_scan(1, LORA_INTRUDERS, 8)
    assert sum(r.n_intruders for r in result.matrices) == 6  # the planted rows, and only them, are intruders
    result.save(tmp_path / "scan")
    out = build_report(tmp_path / "scan", tmp_path / "report.html", png_dir=tmp_path / "png")
    html = out.read_text()

    headline = re.search(r'<section class="headline".*?<p>(.*?)</p>', html, re.S).group(1)
    assert headline.startswith("6 intruder dimensions in 3 of 6 matrices (left singular vectors, ε = 0.5, "
                               "k = 10); mean effective rank of ΔW")
    assert html.index('class="headline"') < html.index("<img")
    assert_self_contained(html)
    assert "lorascope scan base tuned --out scan" in html and "torch 9.9.9-test" in html

    pngs = sorted((tmp_path / "png").glob("*.png"))
    names = {p.stem for p in pngs}
    assert {"intruders_vs_epsilon", "intruders_vs_k", "intruders_per_layer", "intruders_per_module",
            "delta_spectra", "similarity_0"} <= names
    assert {p.stem for p in (tmp_path / "png").glob("*.svg")} == names
    embedded = images(html)
    assert len(embedded) == len(pngs)
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in embedded)
    assert ET.parse(tmp_path / "png" / "similarity_0.svg").getroot().tag.endswith("svg")
    assert not list((tmp_path / "png").glob(".*"))  # no temporary files left behind


def test_similarity_maps_pick_and_mark_intruders(tmp_path):
    run = load(make_scan(1, LORA_INTRUDERS, 8).save(tmp_path)[0]).runs[0]
    (plot,) = figures.similarity_maps([run], n=2)
    axes = [ax for ax in plot.figure.axes if ax.get_images()]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["1.output.dense\n3 intruder(s)", "0.attention.self.value\n2 intruder(s)"]
    for ax, name in zip(axes, (NAMES[5], NAMES[1]), strict=True):
        rows = sorted(round(p.get_y() + 0.5) for p in ax.patches if isinstance(p, Rectangle))
        assert rows == LORA_INTRUDERS[name]  # outlined rows are exactly the rows with max|cos| < ε
        assert np.allclose(ax.get_images()[0].get_array(), run.result.matrices[NAMES.index(name)].similarity)
    (chosen,) = figures.similarity_maps([run], matrices=r"layer\.0\..*query", n=3)
    titles = [ax.get_title() for ax in chosen.figure.axes if ax.get_images()]
    assert titles == ["0.attention.self.query\n0 intruder(s)"]
    with pytest.raises(InputError, match="regex"):
        figures.similarity_maps([run], matrices="(")


def test_single_files_are_accepted(tmp_path):
    make_scan(1, LORA_INTRUDERS, 8).save(tmp_path / "s")
    html = build_report(tmp_path / "s" / "scan.json", tmp_path / "a.html").read_text()
    assert "6 intruder dimensions in 3 of 6 matrices" in html
    write_mitigation(tmp_path / "m")
    html = build_report(tmp_path / "m" / "mitigation.json", tmp_path / "b.html").read_text()
    assert "6 directions rescaled in 3 of 6 matrices" in html
    assert len(images(html)) == 1 and "lorascope mitigate base adapter --lam 0.75" in html
    assert_self_contained(html)


# ---------------------------------------------------------------------------------------- experiment


def test_experiment_report(tmp_path):
    root = make_experiment(tmp_path / "exp")
    data = load(root)
    assert len(data.records) == 2 + len(LAMS) + len(NEIGHBOUR) + len(CONTINUAL)
    assert len(data.tracking) == len(TRACK) and len(data.mitigations) == 1
    assert [r.label for r in data.runs][2:7] == [f"LoRA r=8 on t1, λ = {lam:g}" for lam in LAMS]
    full = [r for r in data.runs if r.result is not None]
    assert sorted(r.label for r in full) == ["LoRA r=8 on t1", "full fine-tuning on t1"]
    assert data.records[0].n_intruders == 6 and data.records[0].run.result is not None

    # Table 3: % change against the λ = 1 record, for intruders and the neighbour control.
    (group,) = tables.lam_groups(data.records)
    table = tables.lam_table(group, 0)
    rows = {r[0]: dict(zip(table.columns, r, strict=True)) for r in table.rows}
    acc1, forg1 = LAMS[1.0]
    for lam, (acc, forg) in LAMS.items():
        assert rows[lam]["intruder Δacc %"] == pytest.approx(100 * (acc - acc1) / acc1)
        assert rows[lam]["intruder Δforgetting %"] == pytest.approx(100 * (forg - forg1) / forg1)
    assert rows[0.5]["neighbour Δforgetting %"] == pytest.approx(100 * (2.55 - forg1) / forg1)
    assert rows[0.25]["neighbour Δacc %"] is None
    assert rows[0.0]["intruders left"] == 0 and rows[1.0]["intruders left"] == 6
    assert rows[1.0]["neighbour Δacc %"] == 0.0  # λ = 1 is the same model for both controls

    (cont,) = tables.continual_groups(data.records)
    ctable = tables.continual_table(cont, 0)
    assert ctable.columns[:5] == ["stage", "task trained", "score t1", "score t2", "score t3"]
    assert [r[2] for r in ctable.rows] == [0.90, 0.80, 0.70] and ctable.rows[0][3] is None
    assert [r[-1] for r in ctable.rows] == [2, 5, 9]

    out = build_report(root, tmp_path / "report.html", png_dir=tmp_path / "png")
    html = out.read_text()
    assert_self_contained(html)
    heads = re.search(r'<section class="headline".*?</section>', html, re.S).group(0)
    assert ("λ trade-off: scaling intruders with λ = 0 changes accuracy by -12.1 % and forgetting by -20.0 % "
            "(neighbour control: -23.1 %, +4.0 %)") in heads
    assert "Continual learning: 3 stages; accuracy on t1 went from 0.9 to 0.7; intruders from 2 to 9." \
        in heads
    assert "During training: intruders went from 0 at step 0 to 5 at step 40." in heads
    assert "6 directions rescaled in 3 of 6 matrices" in heads
    assert ("<p>LoRA r=8 on t1: 6 intruder dimensions in 3 of 6 matrices; full fine-tuning on t1: "
            "0 intruder dimensions in 0 of 6 matrices (left singular vectors, ε = 0.5, k = 10).</p>") in heads
    assert "Forgetting ranges from 2.5 (LoRA r=8) to 3.1 (full fine-tuning) over 2 records." in heads
    names = {p.stem for p in (tmp_path / "png").glob("*.png")}
    assert {"lambda_tradeoff", "continual", "dynamics", "mitigation_0", "similarity_0", "similarity_1",
            "delta_spectra", "intruders_vs_epsilon"} <= names
    assert len(images(html)) == len(names)
    for table_id in ("scans", "lam-0", "continual-0", "records", "matrices", "mitigation-0"):
        assert f'id="table-{table_id}"' in html
    assert "lorascope scan base full --out runs/full" in html


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(InputError, match="no such"):
        load(tmp_path / "missing")
    with pytest.raises(InputError, match="found no scan.json"):
        load(tmp_path)
    (tmp_path / "records.jsonl").write_text('{"unit": {}, "metrics": {}}\n{"unit": \n')
    with pytest.raises(InputError, match=r"records\.jsonl:2: not JSON"):
        load(tmp_path)
    (tmp_path / "records.jsonl").write_text('{"metrics": {"accuracy": 1}}\n')
    with pytest.raises(InputError, match=r"records\.jsonl:1: a record needs a 'unit'"):
        load(tmp_path)
    (tmp_path / "records.jsonl").write_text('{"unit": {}, "metrics": {}, "scan": "nowhere"}\n')
    with pytest.raises(InputError, match="scan 'nowhere' not found"):
        load(tmp_path)
    (tmp_path / "records.jsonl").unlink()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "scan.json").write_text('{"result_kind": "scan", "schema_version": "7.0"}')
    with pytest.raises(InputError, match="schema version '7.0'"):
        load(tmp_path)


def test_cli(tmp_path, monkeypatch):
    from lorascope import cli

    root = make_experiment(tmp_path / "exp")
    monkeypatch.setattr(sys, "argv", ["lorascope", "report", str(root), "--out", str(tmp_path / "r.html"),
                                      "--png-dir", str(tmp_path / "png"), "--n-maps", "1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    html = (tmp_path / "r.html").read_text()
    assert f"lorascope report {root} --out" in html  # the report records its own command
    assert (tmp_path / "png" / "similarity_0.svg").is_file()
    monkeypatch.setattr(sys, "argv", ["lorascope", "report", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------ chromium

PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    errors.push("error: " + (e.message || e.target.src)); }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("rejection: " + e.reason); });
  var oldError = console.error;
  console.error = function () { errors.push("console: " + Array.prototype.join.call(arguments, " ")); };
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
    // Sorting: click the "intruders" header of the matrix table twice; read the column each time.
    var table = document.getElementById("table-matrices");
    var th = Array.prototype.slice.call(table.tHead.rows[0].cells).filter(function (c) {
      return c.textContent === "intruders"; })[0];
    function column() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return Number(r.cells[th.cellIndex].textContent); }); }
    th.click(); var up = column(); th.click(); var down = column();
    var sorted = up.every(function (v, i) { return i === 0 || up[i - 1] <= v; }) &&
                 down.every(function (v, i) { return i === 0 || down[i - 1] >= v; }) && up[0] < down[0];
    var probe = document.createElement("div");
    probe.id = "lorascope-probe";
    probe.setAttribute("data-errors", JSON.stringify(errors));
    probe.setAttribute("data-images", String(imgs.length));
    probe.setAttribute("data-broken", String(broken));
    probe.setAttribute("data-widths", imgs.map(function (i) { return i.naturalWidth; }).join(","));
    probe.setAttribute("data-network", String(performance.getEntriesByType("resource").length));
    probe.setAttribute("data-sorted", String(sorted));
    document.body.appendChild(probe);
    console.error = oldError;
  });
})();
</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars"]


def chromium() -> str | None:
    for name in (os.environ.get("LORASCOPE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_headless_chromium(tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (install it with: apt-get install -y chromium)")
    root = make_experiment(tmp_path / "exp")
    page = build_report(root, tmp_path / "report.html")
    html = page.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("<head>", "<head>\n" + PROBE, 1))

    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, *profile, "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'<div id="lorascope-probe"([^>]*)>', dom.stdout)
    assert found, f"the page did not finish loading in chromium:\n{dom.stderr[-3000:]}"
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', found.group(1)))
    assert json.loads(attrs["errors"].replace("&quot;", '"')) == []
    assert int(attrs["images"]) == len(images(html)) >= 8
    assert attrs["broken"] == "0" and all(int(w) > 0 for w in attrs["widths"].split(","))
    assert attrs["network"] == "0"  # nothing fetched: every image is inline
    assert attrs["sorted"] == "true"

    shot = tmp_path / "report.png"
    run = subprocess.run([browser, *CHROMIUM_FLAGS, *profile, "--window-size=1280,2400",
                          f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.read_bytes().startswith(b"\x89PNG"), run.stderr[-3000:]
    if os.environ.get("LORASCOPE_ARTIFACTS"):
        dest = Path(os.environ["LORASCOPE_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "report_screenshot.png")
        shutil.copy(page, dest / "report.html")


def test_continual_table_of_a_decoder_reads_exact_match_and_lm_loss():
    """A decoder's continual stages score prompt/response tasks by exact match and text tasks by LM loss
    (experiments/kinds/continual.py): both reach the table, each task in the order it was trained."""
    from lorascope.report import tables
    from lorascope.report.loader import Record

    stages = [("arithmetic", {"exact_match/arithmetic": 0.83}), ("strings", {"exact_match/arithmetic": 0.03,
              "exact_match/strings": 0.99}), ("state-union", {"exact_match/arithmetic": 0.0,
              "exact_match/strings": 0.0, "lm_loss/state-union": 3.1})]
    records = [Record({"method": "lora", "rank": 1, "stage": i + 1, "task": t},
                      {**m, "forgetting": 3.2 + i / 10, "forgetting_metric": "lm-loss", "n_intruders": 14 * i})
               for i, (t, m) in enumerate(stages)]
    (group,) = tables.continual_groups(records)
    table = tables.continual_table(group, 0)
    assert table.columns == ["stage", "task trained", "score arithmetic", "score strings", "LM loss state-union",
                             "score", "forgetting (lm-loss)", "intruders"]
    assert [r[2] for r in table.rows] == [0.83, 0.03, 0.0] and table.rows[0][3] is None
    assert [r[4] for r in table.rows] == [None, None, 3.1] and [r[-1] for r in table.rows] == [0, 14, 28]
