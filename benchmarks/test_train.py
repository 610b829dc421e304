"""pytest-benchmark: the train suite of fastlstm.bench (forward + backward; shapes and baselines
from there)."""
import pytest

SUITE = "train"


@pytest.mark.parametrize("side", ["fastlstm", "baseline:0"])
def test_train(run_case, shape, side):
    run_case(SUITE, shape, side)
