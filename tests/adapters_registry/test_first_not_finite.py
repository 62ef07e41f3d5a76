"""validate._first_not_finite: the one foreach check finds the first bad tensor in order."""

import pytest
import torch

from loraplex.adapters_registry.validate import _first_not_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_names_the_first_bad_tensor_across_dtypes_and_empty_ones(bad):
    g = torch.Generator().manual_seed(3)
    named = [
        ("empty", torch.empty(0, 4)),
        ("a", torch.randn(4, 8, generator=g).bfloat16()),
        ("b", torch.randn(8, 4, generator=g)),
        ("c", torch.randn(2, 2, generator=g).half()),
        ("d", torch.randn(3, 3, generator=g)),
    ]
    assert _first_not_finite(named) is None
    named[4][1][1, 2] = bad
    assert _first_not_finite(named) == "d"
    named[2][1][0, 0] = bad
    assert _first_not_finite(named) == "b"


def test_nothing_to_check():
    assert _first_not_finite([("empty", torch.empty(0, 4))]) is None
    assert _first_not_finite([]) is None
