"""The private torch APIs seqpar calls: all present in the installed torch, and a torch without one of them stopped
at the entry point with one `error: torch ...` line naming its version and the fix."""

from __future__ import annotations

import re

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh

from seqpar import torch_compat
from seqpar.errors import UserError

from ..conftest import CONFIG_DIR, ROOT


def test_the_installed_torch_has_every_private_api_seqpar_calls():
    assert torch_compat.missing_apis() == []
    torch_compat.check_torch()


def test_a_torch_without_one_is_one_error_line_naming_its_version_and_the_fix(monkeypatch, capsys):
    from seqpar.preflight import preflight

    monkeypatch.setattr(torch, "__version__", "2.99.0")
    monkeypatch.delattr(DeviceMesh, "_flatten")
    with pytest.raises(SystemExit) as info:
        preflight(CONFIG_DIR, ["trainer.max_steps=1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: torch 2.99.0 lacks torch.distributed.device_mesh.DeviceMesh._flatten, which seqpar calls (tested "
        f"with torch 2.13); install a torch in seqpar's range: pip install '{torch_compat.REQUIREMENT}' (see the "
        "README's 'Which torch build')"]


def test_a_changed_kernel_signature_is_caught(monkeypatch):
    """kernels.py passes the aten attention ops' arguments by position: another order must not be called."""
    name = "_scaled_dot_product_flash_attention_for_cpu"
    leading, results = torch_compat.ATTENTION_OPS[name]
    monkeypatch.setitem(torch_compat.ATTENTION_OPS, name, (("query", "value", "key", *leading[3:]), results))
    monkeypatch.setitem(torch_compat.ATTENTION_OPS, "_no_such_attention_kernel", (("query",), 1))
    assert torch_compat.missing_apis() == [f"aten.{name} with the arguments (query, value, key, dropout_p, "
                                           "is_causal, attn_mask)", "aten._no_such_attention_kernel"]
    with pytest.raises(UserError, match=rf"^torch {re.escape(torch.__version__)} lacks aten.{name} with the "
                                          r"arguments .* \(and 1 more\), which seqpar calls"):
        torch_compat.check_torch()


def test_pyproject_asks_for_the_tested_range():
    assert f'"{torch_compat.REQUIREMENT}"' in (ROOT / "pyproject.toml").read_text()
    assert torch.__version__.startswith(torch_compat.TESTED + ".")


@pytest.mark.parametrize("name, older", [("all_gather_single", "all_gather_into_tensor"),
                                         ("reduce_scatter_single", "reduce_scatter_tensor")])
def test_collectives_renamed_in_2_13_fall_back_to_their_older_names(monkeypatch, name, older):
    """torch 2.13 named these collectives; on an older torch (GPU images often ship one) the same collective under
    its older name is called, with the same arguments."""
    import torch.distributed as dist

    calls = []
    out, x = torch.zeros(4), torch.ones(2)
    monkeypatch.setattr(dist, name, lambda *a, **k: calls.append((name, a, k)), raising=False)
    monkeypatch.setattr(dist, older, lambda *a, **k: calls.append((older, a, k)), raising=False)
    getattr(torch_compat, name)(out, x, group="g")
    monkeypatch.delattr(dist, name)
    getattr(torch_compat, name)(out, x, group="g")
    assert [c[0] for c in calls] == [name, older]
    assert all(c[1][0] is out and c[1][1] is x and c[2] == {"group": "g"} for c in calls)
