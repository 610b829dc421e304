"""pytest-benchmark: the forward suite of fastlstm.bench (shapes and baselines from there)."""
import pytest

SUITE = "forward"


@pytest.mark.parametrize("side", ["fastlstm", "baseline:0"])
def test_forward(run_case, shape, side):
    run_case(SUITE, shape, side)
