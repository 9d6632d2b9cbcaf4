"""Screenshots of the report at 1,400 px, for docs/report/ (issue 22: before and after).

    python docs/report/make_screenshots.py NAME [--src SRC] [--work DIR]

builds the tiny stores of tests/report_inputs.py in DIR (kept, reused), renders their report with the
lorascope found in SRC (default: this checkout's src/; give an old checkout's src/ for "before"), and
writes docs/report/NAME_top.png (the headline and first figures) and NAME_mitigation.png (the
mitigation and sweep sections), each 1,400 px wide rendered and halved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--src", default=str(REPO / "src"))
    ap.add_argument("--work", default="/tmp/lorascope-report-shots")
    args = ap.parse_args()
    work = Path(args.work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}"}
    subprocess.run([sys.executable, "-c", "import sys, report_inputs; from pathlib import Path; "
                    "report_inputs.build(Path(sys.argv[1]))", str(work)], env=env, check=True)
    page = work / f"{args.name}.html"
    env["PYTHONPATH"] = args.src
    subprocess.run([sys.executable, "-c", "import sys; from lorascope.report import build_report; "
                    "build_report(sys.argv[1], sys.argv[2])", str(work / "results"), str(page)], env=env, check=True)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    full = work / f"{args.name}_full.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={work / 'profile'}", "--window-size=1400,16000", f"--screenshot={full}",
                    page.as_uri()], check=True, capture_output=True)
    # where the sections start: offsetTop of each, read back from the rendered page
    probe = work / f"{args.name}_probe.html"
    script = ("<script>addEventListener('load',function(){var o={};document.querySelectorAll('section[id]')"
              ".forEach(function(s){o[s.id]=s.offsetTop});var p=document.createElement('pre');p.id='tops';"
              "p.textContent=JSON.stringify(o);document.body.appendChild(p)})</script>")
    probe.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + script, 1), encoding="utf-8")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={work / 'profile'}",
                          "--window-size=1400,2000", "--dump-dom", probe.as_uri()], capture_output=True, text=True)
    tops = json.loads(re.search(r'<pre id="tops">(.*?)</pre>', dom.stdout).group(1).replace("&quot;", '"'))
    from PIL import Image

    with Image.open(full) as im:
        px = im.convert("RGB")
        start = tops.get("mitigation-0", px.height // 2)
        parts = {"top": (0, 1900), "mitigation": (start - 20, start + 1880)}
        for part, (y0, y1) in parts.items():
            img = px.crop((0, max(0, y0), 1400, min(px.height, y1)))
            small = img.resize((700, img.height // 2), Image.LANCZOS)
            small.quantize(256, method=Image.Quantize.FASTOCTREE).save(HERE / f"{args.name}_{part}.png", optimize=True)
    print(f"wrote {HERE}/{args.name}_top.png and {args.name}_mitigation.png")


if __name__ == "__main__":
    main()
