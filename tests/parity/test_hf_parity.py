"""Our GPT and BERT against transformers' GPT2LMHeadModel and BertForMaskedLM at the same weights (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from seqpar.config import ModelConfig
from seqpar.errors import UserError
from seqpar.models import build_model
from seqpar.models.hf import from_pretrained, read_checkpoint_config, save_pretrained, to_hf

TOL = 1e-4  # max abs logit difference, fp32

CONFIGS = [
    # (arch, layers, hidden, heads, ffn, vocab, positions, activation)
    ("gpt", 2, 64, 4, 256, 512, 64, "gelu_tanh"),
    ("gpt", 3, 45, 5, 70, 97, 40, "gelu_tanh"),  # odd heads, odd vocab
    ("gpt", 1, 21, 3, 33, 1013, 33, "gelu"),
    ("bert", 2, 64, 4, 256, 512, 64, "gelu"),
    ("bert", 3, 45, 5, 70, 97, 40, "gelu"),
    ("bert", 1, 21, 7, 33, 1013, 33, "gelu_tanh"),
]


def make_model(arch, layers, hidden, heads, ffn, vocab, positions, act, seed=0):
    cfg = ModelConfig(
        name="t", arch=arch, num_layers=layers, hidden_size=hidden, num_heads=heads, ffn_hidden_size=ffn,
        vocab_size=vocab, max_seq_len=positions, activation=act, layer_norm_eps=1e-5 if arch == "gpt" else 1e-12,
    )
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # move away from the init's zero biases / unit norms so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(cfg: ModelConfig, b=3, t=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = t or cfg.max_seq_len - 3
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t // 2 :] = 0  # a padded sequence
    types = torch.randint(0, 2, (b, t), generator=g)
    return ids, mask, types


def ours(model, ids, mask, types):
    pos = torch.arange(ids.shape[1])
    with torch.no_grad():
        if model.config.arch == "gpt":
            return model(ids, pos)
        return model(ids, pos, mask, types)


def theirs(hf, arch, ids, mask, types):
    with torch.no_grad():
        if arch == "gpt":
            return hf(input_ids=ids).logits
        return hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


@pytest.mark.parametrize("spec", CONFIGS, ids=[f"{c[0]}-L{c[1]}-H{c[3]}-V{c[5]}-{c[7]}" for c in CONFIGS])
def test_ours_to_transformers(spec):
    model = make_model(*spec)
    hf = to_hf(model)
    ids, mask, types = inputs(model.config)
    a, b = ours(model, ids, mask, types), theirs(hf, spec[0], ids, mask, types)
    real = mask.bool() if spec[0] == "bert" else torch.ones_like(mask, dtype=torch.bool)
    assert (a - b)[real].abs().max().item() < TOL


@pytest.mark.parametrize("spec", CONFIGS, ids=[f"{c[0]}-L{c[1]}-H{c[3]}-V{c[5]}-{c[7]}" for c in CONFIGS])
def test_transformers_to_ours(spec):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    arch, layers, hidden, heads, ffn, vocab, positions, act = spec
    torch.manual_seed(3)
    if arch == "gpt":
        hf_act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[act]
        hf = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=ffn, vocab_size=vocab,
                                        n_positions=positions, activation_function=hf_act, bos_token_id=None, eos_token_id=None))
    else:
        hf_act = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[act]
        hf = BertForMaskedLM(BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                        intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=positions,
                                        hidden_act=hf_act, pad_token_id=0))
    hf.eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model, cfg = from_pretrained(hf)
    model.eval()
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.ffn_size, cfg.vocab_size) == (
        arch, layers, hidden, heads, ffn, vocab)
    ids, mask, types = inputs(cfg)
    a, b = ours(model, ids, mask, types), theirs(hf, arch, ids, mask, types)
    real = mask.bool() if arch == "bert" else torch.ones_like(mask, dtype=torch.bool)
    assert (a - b)[real].abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_directory_round_trip(tmp_path, arch):
    """save_pretrained writes what transformers loads; from_pretrained reads it back bit for bit."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    spec = next(c for c in CONFIGS if c[0] == arch and c[3] == 5)
    model = make_model(*spec)
    save_pretrained(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    auto = AutoModelForCausalLM if arch == "gpt" else AutoModelForMaskedLM
    hf = auto.from_pretrained(tmp_path / "ckpt", local_files_only=True).eval()
    ids, mask, types = inputs(model.config)
    real = mask.bool() if arch == "bert" else torch.ones_like(mask, dtype=torch.bool)
    assert (ours(model, ids, mask, types) - theirs(hf, arch, ids, mask, types))[real].abs().max().item() < TOL
    back, cfg = from_pretrained(tmp_path / "ckpt")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert read_checkpoint_config(tmp_path / "ckpt").num_heads == 5


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_saved_files_are_the_ones_transformers_writes(tmp_path, arch):
    """save_pretrained writes the files itself (without building the transformers model): the same names, JSON
    and tensors as GPT2LMHeadModel / BertForMaskedLM's own save_pretrained."""
    from safetensors import safe_open

    model = make_model(*next(c for c in CONFIGS if c[0] == arch))
    save_pretrained(model, tmp_path / "ours")
    to_hf(model).save_pretrained(str(tmp_path / "theirs"))
    names = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == names
    for name in (n for n in names if n.endswith(".json")):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "theirs" / name).read_text()), name
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "theirs" / "model.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        for k in b.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_unsupported_checkpoint_is_refused(tmp_path):
    model = make_model(*CONFIGS[0])
    save_pretrained(model, tmp_path / "c")
    conf = json.loads((tmp_path / "c" / "config.json").read_text())
    conf["activation_function"] = "relu"
    (tmp_path / "c" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="model.init_from.*activation_function=relu"):
        from_pretrained(tmp_path / "c")
    with pytest.raises(UserError, match="no config.json"):
        read_checkpoint_config(tmp_path)


# Llama (model_type llama) and, with q/k/v biases, Qwen2: odd head counts, key/value groups and vocabularies.
LLAMA_CONFIGS = [
    # (layers, hidden, heads, kv heads, ffn, vocab, qkv_bias, tied)
    (2, 48, 4, 2, 88, 512, False, False),
    (3, 60, 5, 1, 70, 97, False, True),  # odd heads, one key/value head, odd vocab
    (2, 42, 3, 3, 33, 1013, True, False),  # Qwen2, no grouping
    (1, 60, 6, 2, 40, 101, True, True),  # Qwen2, groups of 3
]
LLAMA_IDS = [f"{'qwen2' if c[6] else 'llama'}-L{c[0]}-H{c[2]}-KV{c[3]}-V{c[5]}{'-tied' if c[7] else ''}"
             for c in LLAMA_CONFIGS]


def make_llama(layers, hidden, heads, kv_heads, ffn, vocab, qkv_bias, tied, seed=0):
    cfg = ModelConfig(name="t", arch="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
                      num_kv_heads=kv_heads, ffn_hidden_size=ffn, vocab_size=vocab, max_seq_len=40, activation="silu",
                      layer_norm_eps=1e-6, rope_theta=500.0, qkv_bias=qkv_bias, tie_embeddings=tied)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _llama_logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]))


@pytest.mark.parametrize("spec", LLAMA_CONFIGS, ids=LLAMA_IDS)
def test_llama_to_transformers(spec):
    model = make_llama(*spec)
    hf = to_hf(model)
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if spec[6] else "LlamaForCausalLM")
    ids, _, _ = inputs(model.config)
    with torch.no_grad():
        assert (_llama_logits(model, ids) - hf(input_ids=ids).logits).abs().max().item() < TOL


@pytest.mark.parametrize("spec", LLAMA_CONFIGS, ids=LLAMA_IDS)
def test_transformers_to_llama(spec):
    import transformers

    layers, hidden, heads, kv_heads, ffn, vocab, qkv_bias, tied = spec
    name = "Qwen2" if qkv_bias else "Llama"
    config = getattr(transformers, f"{name}Config")(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=40, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=tied)
    torch.manual_seed(3)
    hf = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model, cfg = from_pretrained(hf)
    model.eval()
    assert (cfg.arch, cfg.num_heads, cfg.kv_heads, cfg.vocab_size, cfg.qkv_bias, cfg.tied_embeddings, cfg.rope_theta) == (
        "llama", heads, kv_heads, vocab, qkv_bias, tied, 500.0)
    ids, _, _ = inputs(cfg)
    with torch.no_grad():
        assert (_llama_logits(model, ids) - hf(input_ids=ids).logits).abs().max().item() < TOL


@pytest.mark.parametrize("spec", [LLAMA_CONFIGS[1], LLAMA_CONFIGS[2]], ids=[LLAMA_IDS[1], LLAMA_IDS[2]])
def test_llama_directory_round_trip_and_files(tmp_path, spec):
    """save_pretrained writes transformers' own files (an untied head's weight included, a tied one left out),
    AutoModelForCausalLM loads them, and from_pretrained reads them back bit for bit."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = make_llama(*spec)
    save_pretrained(model, tmp_path / "ours")
    to_hf(model).save_pretrained(str(tmp_path / "theirs"))
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == json.loads(
        (tmp_path / "theirs" / "config.json").read_text())
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "theirs" / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert ("lm_head.weight" in a.keys()) == (not spec[7])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", local_files_only=True).eval()
    ids, _, _ = inputs(model.config)
    with torch.no_grad():
        assert (_llama_logits(model, ids) - hf(input_ids=ids).logits).abs().max().item() < TOL
    back, cfg = from_pretrained(tmp_path / "ours")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert read_checkpoint_config(tmp_path / "ours").kv_heads == spec[3]


def test_scaled_rope_checkpoint_is_refused(tmp_path):
    model = make_llama(*LLAMA_CONFIGS[0])
    save_pretrained(model, tmp_path / "c")
    conf = json.loads((tmp_path / "c" / "config.json").read_text())
    conf["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    (tmp_path / "c" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="model.init_from.*rope_type=linear"):
        from_pretrained(tmp_path / "c")
