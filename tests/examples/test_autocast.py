import torch

from examples.common import autocast
from flatquant_modifier import FlatQuantModifier


def test_bfloat16_only_for_auto_on_cpus_with_native_bfloat16(monkeypatch):
    for native, device, given, expected in [
        (True, "cpu", "auto", torch.bfloat16),
        (False, "cpu", "auto", "auto"),
        (True, "cuda:0", "auto", "auto"),  # the library's "auto" decides there
        (True, "cpu", None, None),  # an explicit choice stays
    ]:
        monkeypatch.setattr(autocast, "cpu_has_native_bfloat16", lambda: native)
        modifier = FlatQuantModifier(autocast_dtype=given)
        autocast.bfloat16_on_native_cpus(modifier, device)
        assert modifier.autocast_dtype == expected, (native, device, given)
