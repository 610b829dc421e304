"""pytest-benchmark: the decode suite of fastlstm.bench (times are per call of max_new_tokens
tokens; extra_info.tokens gives the count). Baseline 0 is the eager loop, baseline 1 the same
loop with oneDNN disabled (CPU only)."""
import pytest

SUITE = "decode"


@pytest.mark.parametrize("side", ["fastlstm", "baseline:0", "baseline:1"])
def test_decode(run_case, shape, side):
    run_case(SUITE, shape, side)
