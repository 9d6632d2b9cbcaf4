"""Models: load Hugging Face checkpoints and run folders, merge LoRA, move a backbone under another head.

What training writes and evaluation reads, so both build on this module rather than on each other.
A run folder written by :func:`lorascope.train.train` holds::

    OUT/run.json     config, task and label names, metrics, seed, library versions, wall time
    OUT/tokenizer/   the tokenizer used in training (pad token set)
    OUT/adapter/     LoRA runs: the PEFT adapter (adapter_config.json, adapter_model.safetensors),
                     the classification head included through ``modules_to_save``
    OUT/model/       full fine-tuning and merged runs: the whole model (save_pretrained, safetensors)
                     plus a copy of the tokenizer, loadable on its own with ``from_pretrained``

Full fine-tuning saves a task model (e.g. ``BertForSequenceClassification``), whose parameter names
carry the architecture prefix (``bert.encoder...``); a bare base checkpoint such as a
sentence-transformers folder has ``encoder...``. Compare them by suffix.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from lorascope.data.features import fallback_pad_token
from lorascope.errors import InputError, MismatchError
from lorascope.io.identity import FileMemo
from lorascope.io.writers import atomic_dir, atomic_write_json

RUN_FILE = "run.json"
RUN_FORMAT = 1


# ------------------------------------------------------------------------------------------ records


def is_run(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def read_run(path: str | os.PathLike) -> dict[str, Any]:
    """The run record (``run.json``) of a run folder."""
    file = Path(path) / RUN_FILE
    if not file.is_file():
        raise InputError(f"{path} is not a lorascope run folder (no {RUN_FILE})")
    return json.loads(file.read_text(encoding="utf-8"))


def resolve_model_path(model: str | os.PathLike) -> str:
    """A loadable checkpoint: a full or merged run folder resolves to its ``model/``; anything else
    (a checkpoint folder, a hub id) is returned as given."""
    if not is_run(model):
        return str(model)
    record = read_run(model)
    if record["method"] == "lora":
        raise InputError(f"{model} is a LoRA run: pass it as an adapter, or merge it first (merge_lora)")
    return str(Path(model) / record["layout"]["model"])


def root_model(model: str | os.PathLike) -> str:
    """The pretrained checkpoint at the start of a chain of runs (run -> its base -> ...)."""
    seen = set()
    while is_run(model):
        if str(model) in seen:
            raise InputError(f"run folders refer to each other in a loop at {model}")
        seen.add(str(model))
        model = read_run(model)["model"]
    return str(model)


# ------------------------------------------------------------------------------------------ loading


def hf_source(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments for ``path``: a ``.gguf`` file loads from its folder with
    ``gguf_file=`` (transformers dequantises it; needs the ``gguf`` package), anything else as given."""
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        return str(p.parent), {"gguf_file": p.name}
    return str(path), {}


# transformers' GGUF route parses the metadata (the whole vocabulary) and walks the model on every load:
# 17-19 s for SmolLM2-135M on 2 cores, of which dequantising is 2 s, and a tokenizer 6 s more. A process
# that loads one GGUF base many times (an experiment worker's units; evaluate's base and tuned sides)
# keeps its first load and hands out deep copies, so no caller can change what the next one gets. The
# key holds the file's identity (a rewritten file is loaded again) and every load argument.
# Four entries: a unit of a study uses up to three (the causal LM, the backbone AutoModel of an evaluated
# base, the tokenizer); with two, each evicted the next one needed and every load missed.
_GGUF_MEMO = FileMemo(size=4)  # each entry a float32 model (SmolLM2 0.5 GB, Gemma 3 270M 1.1 GB) or tokenizer


def _gguf_memo(path: str | os.PathLike, what: tuple, load: Callable[[], Any]) -> Any:
    """``load()``, or a deep copy of its earlier result for the same unchanged GGUF file and ``what``."""
    return copy.deepcopy(_GGUF_MEMO.get(path, what, load))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars; we check loading results ourselves."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, *, as_saved: bool = False) -> Any:
    """AutoTokenizer with a pad token (EOS, else UNK, when the tokenizer has none). ``as_saved``: a
    tokenizer lorascope saved (a run's), which must split text exactly as its tokenizer.json does, the
    tokenizer the run was trained with (:func:`_as_saved`); a user's or the hub's folder loads as
    transformers loads it."""
    try:
        source, extra = hf_source(path)

        def load() -> Any:
            with quiet_transformers():
                return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)

        tokenizer = _gguf_memo(path, ("tokenizer", trust_remote_code), load) if extra else load()
        if as_saved and (Path(path) / "tokenizer.json").is_file():
            tokenizer = _as_saved(tokenizer, Path(path))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load a tokenizer from {path}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = fallback_pad_token(tokenizer)
    return tokenizer


# Words, digits, accents, CJK, an emoji, markup and a contraction: what a tokenizer rebuilt differently
# from its tokenizer.json splits differently.
_PROBE = "Robert bought 12 + 34 = 46 apples.\n  Ünïcödé — naïve café 東京 🙂 <tag> don't"


def _as_saved(tokenizer: Any, folder: Path) -> Any:
    """The folder's tokenizer as its tokenizer.json defines it. transformers may rebuild a saved tokenizer
    through the class its config names: 5.17 reloads the Unigram tokenizer of Gemma 3's GGUF as
    ``GemmaTokenizer``, a BPE with no merges, i.e. single characters (WikiText-2 loss 10 instead of 5).
    The loaded tokenizer is compared with tokenizer.json on a probe text; if they differ, the file is
    loaded as written, and if that differs too the folder is refused."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        saved = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        raise InputError(f"{folder / 'tokenizer.json'}: not a readable tokenizer file ({e})") from e
    saved.no_truncation()  # a file saved mid-training can keep its truncation length
    saved.no_padding()
    want = saved.encode(_PROBE, add_special_tokens=False).ids
    if not getattr(tokenizer, "is_fast", False) or tokenizer(_PROBE, add_special_tokens=False)["input_ids"] == want:
        return tokenizer
    with quiet_transformers():
        plain = PreTrainedTokenizerFast.from_pretrained(folder)
    if plain(_PROBE, add_special_tokens=False)["input_ids"] != want:
        raise InputError(f"{folder}: the tokenizer does not load as its tokenizer.json defines it "
                         f"({type(tokenizer).__name__} splits text differently)")
    return plain


def head_class(objective: str) -> type:
    return {
        "classify": AutoModelForSequenceClassification,
        "regress": AutoModelForSequenceClassification,
        "lm": AutoModelForCausalLM,
        "mlm": AutoModelForMaskedLM,
    }[objective]


def load_pretrained(
    cls: type, path: str | os.PathLike, *, require_head: str | None = None, trust_remote_code: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """``cls.from_pretrained`` with the loading report checked: a missing weight outside the backbone
    means the checkpoint lacks that head. With ``require_head`` (e.g. "masked-LM") that is an error;
    a missing backbone weight always is, except the pooler (MLM checkpoints have none). The names of
    newly initialised weights are kept in ``model.lorascope_new_weights``."""
    # transformers 5 keeps a checkpoint's dtype by default; fp16/bf16 weights would then be trained in
    # half precision. Recipes keep fp32 master weights (bf16 only as autocast on CUDA).
    kwargs.setdefault("dtype", torch.float32)
    source, extra = hf_source(path)

    def load() -> tuple[torch.nn.Module, dict[str, Any]]:
        try:
            with quiet_transformers():
                model, info = cls.from_pretrained(source, output_loading_info=True,
                                                  trust_remote_code=trust_remote_code, **extra, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot load {cls.__name__} from {path}: {e}") from e
        if extra:
            _unmark_gguf(model, path)
        return model, info

    if extra:
        what = (cls.__module__, cls.__qualname__, trust_remote_code, repr(sorted(kwargs.items())))
        model, info = _gguf_memo(path, what, load)
    else:
        model, info = load()
    prefix = model.base_model_prefix + "."
    missing = sorted(info["missing_keys"])
    head_missing = [k for k in missing if not k.startswith(prefix)]
    backbone_missing = [k for k in missing if k.startswith(prefix) and not k.startswith(prefix + "pooler.")]
    if backbone_missing:
        raise MismatchError(
            f"{path} lacks backbone weights for {type(model).__name__}: {backbone_missing[:5]}"
        )
    if require_head and head_missing:
        raise InputError(f"{path} has no {require_head} head (missing {head_missing[:4]})")
    model.lorascope_new_weights = missing
    return model


def _unmark_gguf(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """transformers marks a model loaded from GGUF as quantized, which makes it unsaveable, even when
    every weight was dequantized to float. Such a model is a plain one: drop the marks."""
    packed = [n for n, t in model.state_dict().items() if not t.is_floating_point()]
    if packed:
        raise InputError(f"{path}: transformers kept {packed[0]} (and {len(packed) - 1} more) as packed GGUF "
                         "blocks; lorascope needs dequantized weights (uninstall the `kernels` package)")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def require_decoder(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Causal-LM training and perplexity need a decoder. Encoders of the masked-LM families (BERT,
    RoBERTa...) load as ``*LMHeadModel`` too, but attend both ways unless ``is_decoder`` is set."""
    config = model.config
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise InputError(f"{path} is a {config.model_type} encoder: it has no causal-LM head to train or score "
                         "(use a decoder such as GPT-2 or Llama)")


def classifier_kwargs(labels: list[str], objective: str) -> dict[str, Any]:
    """from_pretrained arguments for a (new or restored) classification / regression head."""
    if objective == "regress":
        return {"num_labels": 1, "problem_type": "regression", "ignore_mismatched_sizes": True}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": "single_label_classification",
        "ignore_mismatched_sizes": True,
    }


def set_pad_token(model: torch.nn.Module, tokenizer: Any) -> None:
    """Decoder classifiers find the last real token through ``config.pad_token_id``."""
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_base_for_run(
    record: dict[str, Any], base: str | os.PathLike | None = None, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The base model of a run with the run's kind of head (before the adapter is applied)."""
    objective = record["objective"]
    path = resolve_model_path(base if base is not None else record["model"])
    kwargs = classifier_kwargs(record["task"]["labels"], objective) if objective != "lm" else {}
    return load_pretrained(head_class(objective), path, trust_remote_code=trust_remote_code, **kwargs)


def load_trained(
    run_dir_or_model: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """Load a model for evaluation, in eval mode, with its tokenizer.

    - ``load_trained(RUN)``: the tuned model of a run (LoRA: base + adapter, head restored; full or
      merged: ``RUN/model``);
    - ``load_trained(BASE, adapter=RUN_OR_ADAPTER)``: ``BASE`` with a LoRA run's adapter or a bare PEFT
      adapter folder (a full run given as ``adapter`` loads its own model);
    - ``load_trained(CHECKPOINT)``: a plain checkpoint, with the class its config names
      (``architectures[0]``), else AutoModel.
    """
    if adapter is None and is_run(run_dir_or_model):
        record = read_run(run_dir_or_model)
        if record["method"] == "lora":
            return load_trained(record["model"], run_dir_or_model, device=device,
                                trust_remote_code=trust_remote_code)
        adapter, run_dir_or_model = run_dir_or_model, record["model"]
    if adapter is None:
        model, tokenizer = _load_plain(run_dir_or_model, trust_remote_code)
    elif is_run(adapter):
        record = read_run(adapter)
        tokenizer = load_tokenizer(Path(adapter) / record["layout"]["tokenizer"], trust_remote_code, as_saved=True)
        if record["method"] == "lora":
            base = load_base_for_run(record, run_dir_or_model, trust_remote_code)
            set_pad_token(base, tokenizer)
            model = _apply_adapter(base, Path(adapter) / record["layout"]["adapter"])
        else:
            folder = Path(adapter) / record["layout"]["model"]
            cls = head_class(record["objective"])
            model = load_pretrained(cls, folder, trust_remote_code=trust_remote_code)
            set_pad_token(model, tokenizer)
    else:
        model, tokenizer = _load_bare_adapter(run_dir_or_model, adapter, trust_remote_code)
    return model.to(device).eval(), tokenizer


def _apply_adapter(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(f"{adapter_dir} holds no PEFT adapter (no adapter_config.json)")
    try:
        with quiet_transformers():
            return PeftModel.from_pretrained(base, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as e:
        raise MismatchError(f"the adapter in {adapter_dir} does not fit its base model: {e}") from e


def _load_plain(path: str | os.PathLike, trust_remote_code: bool) -> tuple[torch.nn.Module, Any]:
    path = resolve_model_path(path)
    try:
        source, extra = hf_source(path)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read a model config from {path}: {e}") from e
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    model = load_pretrained(cls or AutoModel, path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    set_pad_token(model, tokenizer)
    return model, tokenizer


def _load_bare_adapter(
    base: str | os.PathLike, adapter: str | os.PathLike, trust_remote_code: bool
) -> tuple[torch.nn.Module, Any]:
    """A PEFT adapter folder that is not a lorascope run: the head class follows ``task_type``; for
    sequence classification the label count is read from the saved head's weight."""
    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise InputError(f"{adapter} is neither a run folder nor a PEFT adapter folder")
    task_type = json.loads(config_file.read_text(encoding="utf-8")).get("task_type")
    path = resolve_model_path(base)
    if task_type == "SEQ_CLS":
        model = load_pretrained(AutoModelForSequenceClassification, path, trust_remote_code=trust_remote_code,
                                num_labels=_saved_head_rows(adapter), ignore_mismatched_sizes=True)
    elif task_type == "CAUSAL_LM":
        model = load_pretrained(AutoModelForCausalLM, path, trust_remote_code=trust_remote_code)
    else:
        model, _ = _load_plain(path, trust_remote_code)
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else path,
                               trust_remote_code)
    set_pad_token(model, tokenizer)
    return _apply_adapter(model, adapter), tokenizer


def _saved_head_rows(adapter: Path) -> int:
    file = adapter / "adapter_model.safetensors"
    if not file.is_file():
        raise InputError(f"{adapter} has no adapter_model.safetensors")
    with safe_open(str(file), "pt") as f:
        heads = [k for k in f.keys() if k.endswith(".weight") and (".classifier." in k or ".score." in k)]
        last = [k for k in heads if "out_proj" in k] or heads
        if not last:
            raise InputError(f"{adapter}: a sequence-classification adapter without a saved head")
        return int(f.get_slice(last[-1]).get_shape()[0])


# -------------------------------------------------------------------------------- merge / transplant


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model with LoRA folded in (W + (alpha/r) B A), leaving ``model`` untouched."""
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def merge_lora(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fold a LoRA run into a full model (peft ``merge_and_unload``) and write a merged run folder
    (``model/``, ``tokenizer/``, ``run.json`` with method ``merged``) that can be trained further."""
    record = read_run(run_dir)
    if record["method"] != "lora":
        raise InputError(f"{run_dir} is a {record['method']} run; only LoRA runs can be merged")
    model, tokenizer = load_trained(run_dir)
    model = model.merge_and_unload()
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "tokenizer")
        merged_record = {**record, "method": "merged", "merged_from": str(Path(run_dir).resolve()),
                         "layout": {"model": "model", "tokenizer": "tokenizer", "adapter": None}}
        atomic_write_json(tmp / RUN_FILE, merged_record)
    return Path(out)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The headless transformer inside a task model (``model.bert``, ``model.model``...)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def transplant(head_model: torch.nn.Module, donor: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``head_model`` whose backbone weights are replaced by ``donor``'s (LoRA merged).

    This is how a tuned backbone is scored with a head it was not trained with: the pretrained MLM or
    LM head for forgetting, or an earlier task's classifier in continual learning. Every backbone weight
    of ``head_model`` must be provided, except a pooler (which then stays with the head, as MLM
    checkpoints have none); donor weights it has no place for may only be a pooler.
    """
    target = merged(copy.deepcopy(head_model))
    state = backbone_of(merged(donor)).state_dict()
    try:
        result = backbone_of(target).load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise MismatchError(f"the tuned backbone does not fit the head model: {e}") from e
    missing = [k for k in result.missing_keys if not k.startswith("pooler.")]
    extra = [k for k in result.unexpected_keys if not k.startswith("pooler.")]
    if missing or extra:
        raise MismatchError(f"backbones differ: missing {missing[:5]}, unexpected {extra[:5]}")
    return target.eval()
