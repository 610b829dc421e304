"""pytest-benchmark: the sample suite of fastlstm.bench (shapes and baselines from there)."""
import pytest

SUITE = "sample"


@pytest.mark.parametrize("side", ["fastlstm", "baseline:0"])
def test_sample(run_case, shape, side):
    run_case(SUITE, shape, side)
