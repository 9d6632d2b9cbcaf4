"""Fixtures shared by several test modules."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and steadiest on a busy 2-core machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama_lora(tmp_path):
    """``build(...)`` writes a tiny random LLaMA (tmp_path/base), a PEFT LoRA of it (tmp_path/adapter)
    and, with ``merged=True``, the merged model (tmp_path/merged); returns the three paths (the
    last None without ``merged``). Seeded, so each configuration gives the same weights every time."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(hidden=48, intermediate=80, layers=2, kv_heads=2, alpha=8,
              targets=("q_proj", "v_proj", "down_proj"), merged=False):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                          max_position_embeddings=32)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(tmp_path / "base")
        lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False,
                                                target_modules=list(targets)))
        lora.save_pretrained(tmp_path / "adapter")
        if merged:
            lora.merge_and_unload().save_pretrained(tmp_path / "merged")
        return tmp_path / "base", tmp_path / "adapter", (tmp_path / "merged" if merged else None)

    return build


@pytest.fixture
def read_only(tmp_path):
    """``make(folder)`` makes a folder read-only: permissions, or (as root, whom they do not stop) a
    read-only bind mount, undone afterwards."""
    mounts = []

    def make(folder):
        if os.geteuid() != 0:
            for p in [folder, *folder.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            return
        ok = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
        if ok:
            mounts.append(folder)
            ok = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode == 0
        if not ok:
            pytest.skip("cannot make a read-only folder here (root, and no bind mounts)")

    yield make
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=False)
    if os.geteuid() != 0:
        for p in [tmp_path, *tmp_path.rglob("*")]:
            with contextlib.suppress(OSError):
                p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture
def full_disk(tmp_path):
    """A real, nearly full file system (a 256 KiB tmpfs with 8 KiB left), unmounted afterwards; skips
    where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "filler").write_bytes(b"\0" * (248 * 1024))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
