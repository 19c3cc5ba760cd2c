"""The trainer's loss (`seqpar.trainer.loss.loss_sum`) against `F.cross_entropy`: value and gradient, fp32 and
bf16, ignored tokens, several slabs of rows, and the gradient in the logits' own memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqpar.trainer import loss as loss_module
from seqpar.trainer.loss import loss_sum


def _case(dtype: torch.dtype, n: int = 37, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 16, generator=g)
    weight = (torch.randn(vocab, 16, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100  # ignored tokens
    return hidden.to(dtype), weight, labels


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("slab_elements", [2**22, 150])  # one slab; slabs of 3 rows (the last one shorter)
def test_loss_and_gradients_match_cross_entropy(monkeypatch, dtype, atol, slab_elements):
    monkeypatch.setitem(loss_module.SLAB_ELEMENTS, "cpu", slab_elements)
    hidden, weight, labels = _case(dtype)
    grads = {}
    for name, fn in [("ours", loss_sum),
                     ("torch", lambda x, y: F.cross_entropy(x.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                                      reduction="sum"))]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = (h @ w.t()).view(1, *labels.shape, -1)  # (B, T, V) as a model returns them
        loss = fn(logits, labels.view(1, -1))
        (loss * 0.5).backward()  # an incoming gradient other than 1
        grads[name] = (loss.detach(), h.grad, w.grad)
    for ours, ref in zip(grads["ours"], grads["torch"], strict=True):
        torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=atol)


def test_gradient_is_written_into_the_logits_memory():
    hidden, weight, labels = _case(torch.float32)
    logits = (hidden @ weight.t()).requires_grad_()
    seen = {}

    def hook(grad):
        seen["ptr"] = grad.data_ptr()

    logits.register_hook(hook)
    loss_sum(logits, labels).backward()
    assert seen["ptr"] == logits.data_ptr()
    assert torch.all(logits.grad[labels == -100] == 0)


def test_without_autograd_the_logits_are_left_alone():
    hidden, weight, labels = _case(torch.float32)
    logits = hidden @ weight.t()
    before = logits.clone()
    with torch.no_grad():
        value = loss_sum(logits, labels)
    torch.testing.assert_close(value, F.cross_entropy(before, labels, ignore_index=-100, reduction="sum"))
    assert torch.equal(logits, before)


def test_no_target_token_gives_zero_and_zero_gradient():
    hidden, weight, _ = _case(torch.float32, n=4)
    h = hidden.clone().requires_grad_()
    loss = loss_sum(h @ weight.t(), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0)
