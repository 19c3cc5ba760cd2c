"""Which tensor-parallel degrees fit a grouped-query model: tp shards the key/value heads when it divides them and
replicates each over tp / num_kv_heads ranks when it is a multiple of them; anything else is one UserError that
names parallel.tp and the fix."""

from __future__ import annotations

import pytest

from seqpar.config import DataConfig, ModelConfig, ParallelConfig
from seqpar.errors import UserError
from seqpar.validation.parallel import validate_layout


def _llama(num_heads: int, num_kv_heads: int) -> ModelConfig:
    return ModelConfig(arch="llama", num_layers=2, hidden_size=8 * num_heads, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, ffn_hidden_size=48 * num_heads, vocab_size=960, activation="silu")


@pytest.mark.parametrize("heads,kv,tp", [(4, 2, 2), (4, 2, 4), (4, 1, 4), (8, 2, 8), (12, 3, 6), (12, 4, 4)])
def test_tp_dividing_or_a_multiple_of_the_key_value_heads_is_accepted(heads, kv, tp):
    validate_layout(_llama(heads, kv), DataConfig(), ParallelConfig(tp=tp))


@pytest.mark.parametrize("heads,kv,tp", [(12, 3, 4), (12, 4, 6), (12, 3, 2)])
def test_tp_neither_dividing_nor_a_multiple_of_the_key_value_heads_is_refused(heads, kv, tp):
    with pytest.raises(UserError) as e:
        validate_layout(_llama(heads, kv), DataConfig(), ParallelConfig(tp=tp))
    assert str(e.value) == (
        f"parallel.tp ({tp}) neither divides nor is a multiple of model.num_kv_heads ({kv}); tensor parallelism "
        "shards the key/value heads evenly or replicates each over tp / num_kv_heads ranks; choose a parallel.tp "
        "that divides model.num_kv_heads or is a multiple of it")


def test_tp_not_dividing_the_query_heads_is_refused_first():
    with pytest.raises(UserError, match=r"^parallel.tp \(8\) does not divide model.num_heads \(4\)"):
        validate_layout(_llama(4, 1), DataConfig(), ParallelConfig(tp=8))
