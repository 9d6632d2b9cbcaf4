"""io.layout: the layouts read from names for known architectures equal those of the meta-device model."""

import pytest
import torch
import transformers
from safetensors.torch import save_file

from lorascope.io.checkpoint import Checkpoint
from lorascope.io.layout import NAME_RULES, _module_kinds, matrix_kinds

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, head_dim=8, n_embd=32, n_layer=2, n_head=4,
            n_positions=32, ffn_dim=48, word_embed_proj_dim=32, dim=32, hidden_dim=48, n_heads=4, n_layers=2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("model_type", sorted(NAME_RULES))
def test_name_rules_equal_the_meta_device_model(tmp_path, model_type):
    cfg = transformers.AutoConfig.for_model(model_type, **TINY)
    cfg.architectures = None
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(cfg)  # what _module_kinds builds without `architectures`
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items() if p.dim() in (2, 4)}
    save_file({n: torch.zeros(s) for n, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    ckpt = Checkpoint(tmp_path)
    fast = matrix_kinds(ckpt)
    index, why = _module_kinds(ckpt.config)
    assert not why
    from lorascope.io.layout import _lookup

    slow = {n: _lookup(index, n) for n in fast}
    assert fast == slow, {n: (fast[n], slow[n]) for n in fast if fast[n] != slow[n]}
    assert "embedding" in fast.values() and len(set(fast.values())) >= 2
