"""Format facts: the NPU's Kronecker limits on real model sizes, the fused siblings."""

import pytest

from flatquant_modifier.formats import FUSED_SIBLINGS, INT4_MAX, INT4_MIN, npu_kronecker_problem
from flatquant_modifier.fusion import DEFAULT_SIBLING_PATTERNS, find_sibling_groups
from tests.conftest import build_tiny_llama


@pytest.mark.parametrize(
    "in_features, problem",
    [
        (576, None),  # SmolLM2-135M hidden
        (1536, None),  # SmolLM2-135M intermediate
        (4096, None),  # Llama-3-8B hidden
        (14336, None),  # Llama-3-8B intermediate
        (3584, None),  # Qwen2.5-7B hidden
        (18944, r"18944 decomposes as 128 x 148"),  # Qwen2.5-7B down_proj
        (4864, r"4864 decomposes as 64 x 76"),  # Qwen2.5-0.5B down_proj
        (124, r"in_features=124 is not divisible by 8"),
    ],
)
def test_npu_kronecker_limits(in_features, problem):
    found = npu_kronecker_problem(in_features)
    if problem is None:
        assert found is None
    else:
        assert found is not None and pytest.importorskip("re").search(problem, found)


def test_int4_range_and_sibling_patterns_come_from_one_list():
    assert (INT4_MIN, INT4_MAX) == (-8, 7)
    assert len(DEFAULT_SIBLING_PATTERNS) == len(FUSED_SIBLINGS)
    groups = find_sibling_groups(build_tiny_llama(), DEFAULT_SIBLING_PATTERNS)
    names = sorted(tuple(n.rpartition(".")[2] for n, _ in members) for _, members in groups)
    assert names == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
