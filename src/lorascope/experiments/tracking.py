"""Watch intruder dimensions appear during training (paper §4, "intruders emerge during training").

``IntruderTracker`` scans the model being trained against its base every ``every`` steps with the
same code as ``lorascope scan`` (``pair_matrices`` and the one scan loop,
``scanning.engine.scan_records``, fed the model's live weights as an in-memory tensor source, with the
scan's own base basis), so a tracked count equals a post-hoc scan of a checkpoint saved at that
step. It is cheap because the base side never changes: the left singular vectors of every W_0 are
computed once (float64 Gram route) and kept in memory, and the matrix pairing is done once. Each
scan then costs one top-k of W_0 + ΔW per matrix, with ΔW = s·B A taken from the live LoRA factors
(never multiplied out) or W_t − W_0 for full fine-tuning.

Use it as a transformers ``TrainerCallback`` (``Trainer(..., callbacks=[tracker])``), in lorascope's
own recipe (``lorascope.train.train(cfg, out, callbacks=[tracker])``), or from any loop by calling
``tracker.on_step(model, step)``. Every scan appends a line to ``tracking.jsonl`` (the report draws
them against step) and, when TensorBoard is installed, writes ``intruders/*`` scalars. The line also
holds the mean training loss since the previous line (``train_loss``, from ``on_train_loss`` in
lorascope's loop or the Trainer's logs) and, with a ``score`` function, the task score at that step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lorascope.errors import InputError
from lorascope.io.checkpoint import Checkpoint, MemoryCheckpoint
from lorascope.io.tuned import FullCheckpoint, PeftAdapter, TunedSource
from lorascope.runtime import resolve_device
from lorascope.scanning.engine import default_basis, scan_records
from lorascope.scanning.options import ScanOptions
from lorascope.scanning.pairing import MatrixPair, pair_matrices
from lorascope.schema import MatrixRecord, summarize
from lorascope.spectral import SVD

TRACKING_FILE = "tracking.jsonl"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return sorted(obj) if isinstance(obj, set) else list(obj)
    return str(obj)


def model_source(model: torch.nn.Module, initial: dict[str, torch.Tensor] | None = None) -> TunedSource:
    """The live weights of ``model`` as a tuned source: a peft model as its adapter (converted to a
    plain LoRA on the unchanged base when its init mutated the base, see ``unmutate_lora``), anything
    else as a full checkpoint."""
    from peft import PeftModel, get_peft_model_state_dict

    from lorascope.train.lora import unmutate_lora

    if isinstance(model, PeftModel):
        name = model.active_adapter
        config = json.loads(json.dumps(model.peft_config[name].to_dict(), default=_jsonable))
        state = get_peft_model_state_dict(model, adapter_name=name)
        if initial is not None:
            state, config = unmutate_lora(state, initial, config)
        return PeftAdapter.from_state(config, state)
    return FullCheckpoint(MemoryCheckpoint(model.state_dict(), "<in-memory model>"))


def _mutating_init(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    from lorascope.train.config import is_mutating_init

    if not isinstance(model, PeftModel):
        return False
    return is_mutating_init(getattr(model.peft_config[model.active_adapter], "init_lora_weights", True))


# ------------------------------------------------------------------------------------------ tracker


class IntruderTracker(TrainerCallback):
    """Count intruder dimensions (Alg. 1) of the model in training against ``base`` every ``every`` steps.

    ``base``: the pretrained checkpoint (folder, file or hub id). ``options`` (or its keywords ``k``,
    ``epsilon``, ``modules``, ``side``, ``embeddings``, ``device``, ``dtype``): as in ``lorascope.scan``.
    ``log``: a ``tracking.jsonl`` to append to.
    ``tensorboard``: a log folder (used when TensorBoard is installed). ``unit``: labels stored with
    each line. ``score``: ``score(model) -> {name: value}`` called at every scanned step (e.g.
    ``lorascope.train.recipes.task_scorer``); its ``test_accuracy`` (or ``test_spearman``,
    ``test_exact_match``) is logged as ``task_score``. ``history`` keeps ``(step, summary)`` of every
    scan; ``last`` the last per-matrix records.
    """

    def __init__(
        self,
        base: str | os.PathLike,
        every: int = 50,
        log: str | os.PathLike | None = None,
        tensorboard: str | os.PathLike | None = None,
        unit: dict[str, Any] | None = None,
        options: ScanOptions | None = None,
        score: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        **scan_settings: Any,
    ):
        if every < 1:
            raise InputError(f"every must be a positive number of steps, got {every}")
        opts = options or ScanOptions()
        self.options = opts.with_(**scan_settings) if scan_settings else opts
        self.base = Checkpoint(base)
        self.every, self.k, self.epsilon = every, self.options.k, self.options.epsilon
        self.device = resolve_device(self.options.device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[self.options.dtype]
        self.log = Path(log) if log is not None else None
        self.unit = dict(unit or {})
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.last: list[MatrixRecord] = []
        self._bases: dict[str, SVD] = {}
        self._pairs: list[MatrixPair] | None = None
        self._initial: dict[str, torch.Tensor] | None = None
        self._seen_first = False
        self._tb = _tensorboard(tensorboard) if tensorboard is not None else None
        self.score = score
        self._losses: list[float] = []  # training losses since the last scanned step

    # -- the cached base ------------------------------------------------------------------------
    def basis(self, key: str, W: torch.Tensor) -> SVD:
        """All left singular vectors of the base matrix ``key``, computed once, by the scan's own route."""
        if key not in self._bases:
            self._bases[key] = default_basis(key, W)
        return self._bases[key]

    # -- scanning -------------------------------------------------------------------------------
    @torch.no_grad()
    def scan_model(self, model: torch.nn.Module) -> list[MatrixRecord]:
        """Alg. 1 on every paired matrix of ``model``'s current weights."""
        source = model_source(model, self._initial)
        if self._pairs is None:
            self._pairs, _ = pair_matrices(self.base, source, self.options)
        records: list[MatrixRecord] = []
        for recs in scan_records(self.base, source, self._pairs, self.k, self.epsilon, self.options.sides,
                                 self.device, self.dtype, basis=self.basis, streams=1):
            records.extend(recs)
        return records

    def on_step(self, model: torch.nn.Module, step: int) -> dict[str, Any] | None:
        """Scan when ``step`` is a multiple of ``every`` (step 0: before the first update). Returns
        the logged line, or None when this step is not scanned."""
        if model is None:
            return None
        if not self._seen_first:
            self._seen_first = True
            if _mutating_init(model):  # keep the initial factors: ΔW = s (B A − B0 A0)
                if step != 0:
                    raise InputError("tracking an adapter with a PiSSA-style init must start at step 0")
                from lorascope.train.lora import lora_factors

                self._initial = lora_factors(model)
        if step % self.every != 0 or (self.history and self.history[-1][0] == step):
            return None
        return self.record(model, step)

    def on_fit_end(self, model: torch.nn.Module, step: int) -> dict[str, Any] | None:
        """Scan the final weights (unless this step was just scanned) and close TensorBoard."""
        line = None
        if model is not None and not (self.history and self.history[-1][0] == step):
            line = self.record(model, step)
        if self._tb is not None:
            self._tb.flush()
        return line

    def record(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        self.last = self.scan_model(model)
        summary = summarize(self.last, self.epsilon, self.k)
        side = "left" if "left" in summary["sides"] else sorted(summary["sides"])[0]
        s = summary["sides"][side]
        metrics = {"n_intruders": s["n_intruders"], "matrices_with_intruders": s["matrices_with_intruders"],
                   "effective_rank": s["mean_delta_effective_rank"],
                   "scan_seconds": round(time.perf_counter() - start, 4)}
        if self._losses:
            metrics["train_loss"] = sum(self._losses) / len(self._losses)
            self._losses = []
        if self.score is not None:
            scores = self.score(model)
            metrics.update(scores)
            name = next((k for k in ("test_accuracy", "test_spearman", "test_exact_match") if k in scores), None)
            if name is not None:
                metrics["task_score"] = scores[name]
        line = {"step": int(step), "unit": self.unit, "metrics": metrics, "scan": summary}
        self.history.append((int(step), summary))
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, allow_nan=False) + "\n")
        if self._tb is not None:
            self._tb.add_scalar("intruders/total", s["n_intruders"], step)
            self._tb.add_scalar("intruders/matrices_with_intruders", s["matrices_with_intruders"], step)
            self._tb.add_scalar("delta/mean_effective_rank", s["mean_delta_effective_rank"], step)
            for layer, n in s["per_layer"].items():
                self._tb.add_scalar(f"intruders/layer_{layer}", n, step)
        return line

    def on_train_loss(self, step: int, loss: float) -> None:
        """The training loss of one step (lorascope's loop calls this before ``on_step``)."""
        self._losses.append(float(loss))

    # -- transformers.Trainer hooks -------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and isinstance(logs.get("loss"), (int, float)):
            self._losses.append(float(logs["loss"]))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.on_step(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.on_step(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.on_fit_end(model, state.global_step)


def _tensorboard(log_dir: str | os.PathLike) -> Any:
    """A TensorBoard SummaryWriter, or None, with a note saying so, when tensorboard is not installed
    (it is optional: the counts still go to tracking.jsonl)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(f"note: TensorBoard is not installed, so no intruder scalars are written to {log_dir} "
              "(pip install 'lorascope[tensorboard]'); tracking.jsonl still gets every count", file=sys.stderr)
        return None
    return SummaryWriter(str(log_dir))
