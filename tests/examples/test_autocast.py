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


def test_the_model_loads_in_bfloat16_only_for_auto_on_cpus_with_native_bfloat16(monkeypatch):
    for native, device, given, expected in [
        (True, "cpu", "auto", torch.bfloat16),
        (False, "cpu", "auto", torch.float32),
        (True, "cuda:0", "auto", torch.float32),  # FlatQuant autocasts there
        (False, "cpu", "bfloat16", torch.bfloat16),  # an explicit choice stays
        (True, "cpu", "float32", torch.float32),
    ]:
        monkeypatch.setattr(autocast, "cpu_has_native_bfloat16", lambda: native)
        assert autocast.model_dtype(given, device) == expected, (native, device, given)
