"""balance_value_output: an exact rescaling of value/output pairs that fine-tuning can move safely."""

import torch
from hf_tiny import bert_encoder, token_batches

from tensorfold.compression.finetune import balance_value_output


def _skewed_encoder():
    """A tiny BERT whose first attention carries its value/output product as a vo-svd fit leaves it:
    value rows scaled down 1000x, the output columns that read them up 1000x (the same function)."""
    model = bert_encoder(layers=2)
    attention = model.encoder.layer[0].attention
    with torch.no_grad():
        attention.self.value.weight.mul_(1e-3)
        attention.self.value.bias.mul_(1e-3)
        attention.output.dense.weight.mul_(1e3)
    return model


def test_balancing_keeps_the_function_and_evens_the_norms():
    model = _skewed_encoder()
    batch = token_batches(n=1)[0]
    before = model(**batch).last_hidden_state
    assert balance_value_output(model) == 1  # the untouched second attention is left alone
    after = model(**batch).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    attention = model.encoder.layer[0].attention
    rows = attention.self.value.weight.norm(dim=1)
    cols = attention.output.dense.weight.norm(dim=0)
    torch.testing.assert_close(rows, cols, rtol=1e-5, atol=1e-6)
    ratio = (attention.output.dense.weight.norm() / attention.self.value.weight.norm()).item()
    assert 0.5 < ratio < 2.0  # was ~1e6


def test_balanced_pairs_are_left_as_they_are():
    model = bert_encoder(layers=2)
    weights = [p.clone() for p in model.parameters()]
    assert balance_value_output(model) == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_a_pair_with_fewer_dimensions_per_head_is_balanced_against_the_reference_blocks():
    reference = bert_encoder(layers=1)  # 4 heads of 8 dimensions
    model = bert_encoder(layers=1)
    attention = model.encoder.layer[0].attention
    keep = torch.cat([torch.arange(h * 8, h * 8 + 5) for h in range(4)])  # 5 of 8 dimensions per head
    with torch.no_grad():
        value, output = attention.self.value, attention.output.dense
        small_v = torch.nn.Linear(32, 20)
        small_v.weight.copy_(value.weight[keep] * 1e-3)
        small_v.bias.copy_(value.bias[keep] * 1e-3)
        small_o = torch.nn.Linear(20, 32)
        small_o.weight.copy_(output.weight[:, keep] * 1e3)
        small_o.bias.copy_(output.bias)
    attention.self.value, attention.output.dense = small_v, small_o
    attention.self.attention_head_size, attention.self.all_head_size = 5, 20  # value heads of 5 dimensions
    assert balance_value_output(model, reference) == 1
    torch.testing.assert_close(small_v.weight.norm(dim=1), small_o.weight.norm(dim=0), rtol=1e-5, atol=1e-6)
