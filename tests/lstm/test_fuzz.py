"""Property-based tests: random valid configurations against nn.LSTM / nn.LSTMCell, and random
invalid inputs that must fail exactly as nn.LSTM fails (same exception type) or succeed exactly
as it succeeds (same results).
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm
from fastlstm import _backends

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import backend_params as _backends_for  # noqa: E402


# Examples per backend: the reference backend gets many; the fused ones fewer and tinier (the
# Triton interpreter runs each program in Python), which keeps the file well under a minute.
_EXAMPLES = {"torch": 100, "cpu": 40, "triton": 8, "cuda": 40}
_MAX_SIZE = {"torch": 6, "cpu": 6, "triton": 3, "cuda": 6}
_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _dtype(backend):
    if _backends.supports_dtype(backend, "cpu", torch.float64):
        return torch.float64
    return torch.float32


def _tolerance(dtype):
    return dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)


@st.composite
def lstm_configs(draw, max_size):
    hidden = draw(st.integers(1, max_size))
    return dict(
        input_size=draw(st.integers(1, max_size)),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.integers(0, hidden - 1)),
    )


def _pair(config, backend, dtype):
    torch.manual_seed(0)
    reference = nn.LSTM(**config, dtype=dtype)
    fast = fastlstm.LSTM(**config, dtype=dtype, backend=backend)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _leaves(value):
    if isinstance(value, PackedSequence):
        return [value.data, value.batch_sizes]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _compare_runs(reference, fast, make_args, tolerance, label=""):
    """Run both modules on fresh copies of the same arguments: same exception type, or same
    outputs and gradients."""
    outcomes = []
    for module in (reference, fast):
        module.zero_grad(set_to_none=True)
        args = make_args()
        try:
            result = module(*args)
        except Exception as error:  # noqa: BLE001 - the type is what is compared
            outcomes.append(("raised", type(error), error, None))
            continue
        outputs = [leaf for leaf in _leaves(result) if leaf.is_floating_point()]
        inputs = [leaf for leaf in _leaves(args) if isinstance(leaf, torch.Tensor)
                  and leaf.requires_grad]
        grads = []
        if outputs and inputs and all(o.numel() for o in outputs):
            loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum()
                       for o in outputs)
            grads = torch.autograd.grad(loss, inputs + list(module.parameters()),
                                        allow_unused=True)
        outcomes.append(("returned", [o.detach() for o in _leaves(result)], None, grads))
    (ref_kind, ref_value, ref_error, ref_grads), (kind, value, error, grads) = outcomes
    if ref_kind == "raised":
        assert kind == "raised", (
            f"{label}: nn.LSTM raised {ref_value.__name__}: {ref_error}; fastlstm returned")
        assert value is ref_value, (f"{label}: nn.LSTM raised {ref_value.__name__} ({ref_error}); "
                                    f"fastlstm raised {value.__name__} ({error})")
        return "raised"
    assert kind == "returned", (
        f"{label}: nn.LSTM returned; fastlstm raised {value.__name__}: {error}")
    assert len(value) == len(ref_value)
    for index, (a, b) in enumerate(zip(ref_value, value)):
        assert a.shape == b.shape and a.dtype == b.dtype, (index, a.shape, b.shape)
        torch.testing.assert_close(b, a, **tolerance, msg=lambda m: f"output {index}: {m}")
    assert len(grads) == len(ref_grads)
    for index, (a, b) in enumerate(zip(ref_grads, grads)):
        if a is None or b is None:
            assert (a is None) == (b is None) or (a if b is None else b).abs().max() == 0, index
            continue
        torch.testing.assert_close(b, a, **tolerance, msg=lambda m: f"gradient {index}: {m}")
    return "returned"


# ---------------------------------------------------------------------------------------------
# Valid configurations
# ---------------------------------------------------------------------------------------------

def _valid_lstm_property(backend):
    max_size = _MAX_SIZE[backend]
    dtype = _dtype(backend)

    @settings(max_examples=_EXAMPLES[backend], **_SETTINGS)
    @given(config=lstm_configs(max_size), data=st.data())
    def check(config, data):
        reference, fast = _pair(config, backend, dtype)
        mode = data.draw(st.sampled_from(["batched", "unbatched", "packed"]))
        with_hx = data.draw(st.booleans())
        train = data.draw(st.booleans())
        reference.train(train)
        fast.train(train)
        steps = data.draw(st.integers(1, max_size))
        batch = 1 if mode == "unbatched" else data.draw(st.integers(1, 4))
        directions = 2 if config["bidirectional"] else 1
        real_hidden = config["proj_size"] or config["hidden_size"]
        seed = data.draw(st.integers(0, 2 ** 16))
        lengths = None
        if mode == "packed":
            lengths = torch.tensor(data.draw(st.lists(st.integers(1, steps), min_size=batch,
                                                      max_size=batch)))
            lengths[0] = steps

        def make_args():
            generator = torch.Generator().manual_seed(seed)
            if mode == "unbatched":
                x = torch.randn(steps, config["input_size"], generator=generator, dtype=dtype)
            elif config["batch_first"]:
                x = torch.randn(batch, steps, config["input_size"], generator=generator,
                                dtype=dtype)
            else:
                x = torch.randn(steps, batch, config["input_size"], generator=generator,
                                dtype=dtype)
            x.requires_grad_(True)
            hx = None
            if with_hx:
                shape = (config["num_layers"] * directions,) + (
                    () if mode == "unbatched" else (batch,))
                hx = (torch.randn(*shape, real_hidden, generator=generator, dtype=dtype,
                                  requires_grad=True),
                      torch.randn(*shape, config["hidden_size"], generator=generator, dtype=dtype,
                                  requires_grad=True))
            if mode == "packed":
                x = pack_padded_sequence(x, lengths, batch_first=config["batch_first"],
                                         enforce_sorted=False)
            return (x, hx)

        # Dropout between layers draws random numbers: off here, so both draw nothing.
        assert _compare_runs(reference, fast, make_args, _tolerance(dtype)) == "returned"

    return check


@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_valid_lstm_configurations(backend):
    _valid_lstm_property(backend)()


@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_valid_cell_configurations(backend):
    max_size = _MAX_SIZE[backend]
    dtype = _dtype(backend)

    @settings(max_examples=_EXAMPLES[backend], **_SETTINGS)
    @given(input_size=st.integers(1, max_size), hidden=st.integers(1, max_size),
           bias=st.booleans(), batch=st.one_of(st.none(), st.integers(1, 4)),
           with_hx=st.booleans(), seed=st.integers(0, 2 ** 16))
    def check(input_size, hidden, bias, batch, with_hx, seed):
        torch.manual_seed(0)
        reference = nn.LSTMCell(input_size, hidden, bias=bias, dtype=dtype)
        fast = fastlstm.LSTMCell(input_size, hidden, bias=bias, dtype=dtype, backend=backend)
        fast.load_state_dict(reference.state_dict())
        lead = () if batch is None else (batch,)

        def make_args():
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(*lead, input_size, generator=generator, dtype=dtype,
                            requires_grad=True)
            hx = None
            if with_hx:
                hx = tuple(torch.randn(*lead, hidden, generator=generator, dtype=dtype,
                                       requires_grad=True) for _ in range(2))
            return (x, hx)

        assert _compare_runs(reference, fast, make_args, _tolerance(dtype)) == "returned"

    check()


# ---------------------------------------------------------------------------------------------
# Invalid (and unusual) inputs: whatever nn.LSTM does, fastlstm does
# ---------------------------------------------------------------------------------------------

LSTM_CASES = [
    "wrong_input_size", "input_1d", "input_4d", "integer_input", "half_input", "double_input",
    "non_contiguous", "expanded", "empty_batch", "zero_length", "hx_wrong_layers",
    "hx_wrong_batch", "hx_wrong_hidden", "cx_wrong_hidden", "hx_2d_for_batched",
    "hx_3d_for_unbatched", "hx_wrong_dtype", "hx_not_tuple", "hx_three_tensors",
    "meta_input", "meta_hx", "packed_wrong_size", "packed_hx_wrong_batch",
]
PACKED_UNCHECKED = {"packed_wrong_size", "packed_hx_wrong_batch"}


def _invalid_lstm_args(case, config, steps, batch, dtype, generator):
    directions = 2 if config["bidirectional"] else 1
    layers = config["num_layers"] * directions
    hidden, real_hidden = config["hidden_size"], config["proj_size"] or config["hidden_size"]
    input_size = config["input_size"]

    def randn(*shape, dtype=dtype, device="cpu"):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    def dense(*, features=input_size, batch=batch, steps=steps, dtype=dtype):
        shape = (batch, steps, features) if config["batch_first"] else (steps, batch, features)
        return randn(*shape, dtype=dtype)

    good_hx = (randn(layers, batch, real_hidden), randn(layers, batch, hidden))
    if case == "wrong_input_size":
        return dense(features=input_size + 1), None
    if case == "input_1d":
        return randn(input_size), None
    if case == "input_4d":
        return randn(1, steps, batch, input_size), None
    if case == "integer_input":
        return torch.randint(0, 3, dense().shape, generator=generator), None
    if case == "half_input":
        return dense(dtype=torch.float16), None
    if case == "double_input":  # module weights are float32 in these cases
        return dense(dtype=torch.float64), None
    if case == "non_contiguous":
        # Features outermost in memory: strided in every dimension that has more than one
        # element.
        x = randn(input_size, *dense().shape[:2]).permute(1, 2, 0)
        return x, tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in good_hx)
    if case == "expanded":
        x = randn(1, 1, input_size).expand(*dense().shape[:2], input_size)
        return x, (good_hx[0][:, :1].expand_as(good_hx[0]), good_hx[1])
    if case == "empty_batch":
        return dense(batch=0), None
    if case == "zero_length":
        return dense(steps=0), None
    if case == "hx_wrong_layers":
        return dense(), (randn(layers + 1, batch, real_hidden), randn(layers + 1, batch, hidden))
    if case == "hx_wrong_batch":
        return dense(), (randn(layers, batch + 1, real_hidden), randn(layers, batch + 1, hidden))
    if case == "hx_wrong_hidden":
        return dense(), (randn(layers, batch, real_hidden + 1), good_hx[1])
    if case == "cx_wrong_hidden":
        return dense(), (good_hx[0], randn(layers, batch, hidden + 1))
    if case == "hx_2d_for_batched":
        return dense(), (good_hx[0][:, 0], good_hx[1][:, 0])
    if case == "hx_3d_for_unbatched":
        return randn(steps, input_size), (good_hx[0][:, :1], good_hx[1][:, :1])
    if case == "hx_wrong_dtype":
        return dense(), (good_hx[0].double(), good_hx[1])
    if case == "hx_not_tuple":
        return dense(), good_hx[0]
    if case == "hx_three_tensors":
        return dense(), (good_hx[0], good_hx[1], good_hx[1])
    if case == "meta_input":
        return dense().to("meta"), None
    if case == "meta_hx":
        return dense(), (good_hx[0].to("meta"), good_hx[1].to("meta"))
    if case == "packed_wrong_size":
        lengths = torch.full((batch,), steps)
        return pack_padded_sequence(dense(features=input_size + 1), lengths,
                                    batch_first=config["batch_first"]), None
    if case == "packed_hx_wrong_batch":
        lengths = torch.full((batch,), steps)
        return (pack_padded_sequence(dense(), lengths, batch_first=config["batch_first"]),
                (randn(layers, batch + 1, real_hidden), randn(layers, batch + 1, hidden)))
    raise AssertionError(case)


@pytest.mark.parametrize("case", LSTM_CASES)
@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_invalid_lstm_inputs_fail_like_nn_lstm(backend, case):
    max_size = _MAX_SIZE[backend]

    @settings(max_examples=6 if backend == "torch" else 2, **_SETTINGS)
    @given(config=lstm_configs(max_size), steps=st.integers(1, max_size),
           batch=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
    def check(config, steps, batch, seed):
        reference, fast = _pair(config, backend, torch.float32)

        def make_args():
            return _invalid_lstm_args(case, config, steps, batch, torch.float32,
                                      torch.Generator().manual_seed(seed))

        if case in PACKED_UNCHECKED:
            # nn.LSTM checks no sizes for a PackedSequence (and runs on, reading garbage);
            # fastlstm checks, raising what nn.LSTM raises for the same mistake in a dense input.
            try:
                reference(*make_args())
            except Exception as error:  # noqa: BLE001
                with pytest.raises(type(error)):
                    fast(*make_args())
            else:
                with pytest.raises(RuntimeError, match="size"):
                    fast(*make_args())
            return
        _compare_runs(reference, fast, make_args, _tolerance(torch.float32), label=case)

    check()


CELL_CASES = [
    "wrong_input_size", "input_3d", "input_0d", "integer_input", "hx_wrong_batch",
    "hx_wrong_hidden", "hx_3d", "hx_1d_for_batched", "hx_wrong_dtype", "double_input",
    "empty_batch", "non_contiguous", "expanded", "meta_hx",
]


def _invalid_cell_args(case, input_size, hidden, batch, generator):
    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator, dtype=dtype)

    x = randn(batch, input_size)
    hx = (randn(batch, hidden), randn(batch, hidden))
    if case == "wrong_input_size":
        return randn(batch, input_size + 1), hx
    if case == "input_3d":
        return randn(1, batch, input_size), None
    if case == "input_0d":
        return randn(), None
    if case == "integer_input":
        return torch.randint(0, 3, (batch, input_size), generator=generator), None
    if case == "hx_wrong_batch":
        return x, (randn(batch + 1, hidden), randn(batch + 1, hidden))
    if case == "hx_wrong_hidden":
        return x, (randn(batch, hidden + 1), hx[1])
    if case == "hx_3d":
        return x, (hx[0][None], hx[1][None])
    if case == "hx_1d_for_batched":
        return x, (hx[0][0], hx[1][0])
    if case == "hx_wrong_dtype":
        return x, (hx[0].double(), hx[1])
    if case == "double_input":
        return x.double(), None
    if case == "empty_batch":
        return randn(0, input_size), None
    if case == "non_contiguous":
        return randn(2 * batch, input_size)[::2], tuple(t.t().contiguous().t() for t in hx)
    if case == "expanded":
        return randn(1, input_size).expand(batch, input_size), (hx[0][:1].expand_as(hx[0]), hx[1])
    if case == "meta_hx":
        return x, (hx[0].to("meta"), hx[1].to("meta"))
    raise AssertionError(case)


@pytest.mark.parametrize("case", CELL_CASES)
@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_invalid_cell_inputs_fail_like_nn_lstm_cell(backend, case):
    max_size = _MAX_SIZE[backend]

    @settings(max_examples=5 if backend == "torch" else 2, **_SETTINGS)
    @given(input_size=st.integers(1, max_size), hidden=st.integers(1, max_size),
           batch=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
    def check(input_size, hidden, batch, seed):
        torch.manual_seed(0)
        reference = nn.LSTMCell(input_size, hidden)
        fast = fastlstm.LSTMCell(input_size, hidden, backend=backend)
        fast.load_state_dict(reference.state_dict())

        def make_args():
            return _invalid_cell_args(case, input_size, hidden, batch,
                                      torch.Generator().manual_seed(seed))

        _compare_runs(reference, fast, make_args, _tolerance(torch.float32), label=case)

    check()


# ---------------------------------------------------------------------------------------------
# The fused backends' ops themselves: every bad argument is rejected before memory is touched
# ---------------------------------------------------------------------------------------------

OP_MUTATIONS = [
    "xg_width", "xg_rows", "xg_1d", "xg_dtype", "h0_batch", "h0_width", "c0_width", "c0_batch",
    "w_hh_shape", "w_hr_shape", "batch_sizes_increase",
    "batch_sizes_sum", "batch_sizes_first_above_batch", "batch_sizes_negative",
    "batch_sizes_float", "batch_sizes_2d", "h0_dtype", "w_hh_dtype",
]


def _op_args(steps, batch, hidden, proj, packed, generator):
    """Valid arguments of recurrence_forward (see fastlstm/lstm/recurrence.py)."""
    real = proj or hidden
    if packed:
        lengths = sorted(torch.randint(1, steps + 1, (batch,), generator=generator).tolist(),
                         reverse=True)
        lengths[0] = steps
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(steps)],
                                   dtype=torch.int64)
        rows = int(batch_sizes.sum())
    else:
        batch_sizes = torch.empty(0, dtype=torch.int64)
        rows = steps * batch

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * 0.5

    return dict(xg=randn(rows, 4 * hidden), batch_sizes=batch_sizes, h0=randn(batch, real),
                c0=randn(batch, hidden), w_hh=randn(4 * hidden, real),
                w_hr=randn(proj, hidden) if proj else None, reverse=False, save=True)


def _mutate(args, mutation):
    args = dict(args)
    rows, gates = args["xg"].shape
    batch, real = args["h0"].shape
    hidden = args["c0"].shape[1]
    if mutation == "xg_width":
        args["xg"] = torch.zeros(rows, gates + 1)
    elif mutation == "xg_rows":
        args["xg"] = torch.zeros(rows + 1, gates)
    elif mutation == "xg_1d":
        args["xg"] = args["xg"].reshape(-1)
    elif mutation == "xg_dtype":
        args["xg"] = args["xg"].double()
    elif mutation == "h0_batch":
        args["h0"] = torch.zeros(batch + 1, real)
    elif mutation == "h0_width":
        args["h0"] = torch.zeros(batch, real + 1)
    elif mutation == "c0_width":
        args["c0"] = torch.zeros(batch, hidden + 1)
    elif mutation == "c0_batch":
        args["c0"] = torch.zeros(batch + 1, hidden)
    elif mutation == "w_hh_shape":
        args["w_hh"] = torch.zeros(4 * hidden, real + 1)
    elif mutation == "w_hr_shape":
        args["w_hr"] = torch.zeros(real + 1, hidden)
    elif mutation == "batch_sizes_increase":
        args["batch_sizes"] = torch.tensor([1] * (rows - batch) + [batch], dtype=torch.int64) \
            if rows > batch else torch.tensor([batch - 1, batch], dtype=torch.int64)
    elif mutation == "batch_sizes_sum":
        sizes = args["batch_sizes"] if args["batch_sizes"].numel() else torch.full(
            (rows // batch,), batch, dtype=torch.int64)
        args["batch_sizes"] = torch.cat([sizes, torch.ones(1, dtype=torch.int64)])
    elif mutation == "batch_sizes_first_above_batch":
        args["batch_sizes"] = torch.tensor([batch + 1] + [1] * max(rows - batch - 1, 0),
                                           dtype=torch.int64)
    elif mutation == "batch_sizes_negative":
        args["batch_sizes"] = torch.tensor([batch, -1, 1], dtype=torch.int64)
    elif mutation == "batch_sizes_float":
        args["batch_sizes"] = torch.full((rows // batch,), float(batch))
    elif mutation == "batch_sizes_2d":
        args["batch_sizes"] = torch.full((1, rows // batch), batch, dtype=torch.int64)
    elif mutation == "h0_dtype":
        args["h0"] = args["h0"].double()
    elif mutation == "w_hh_dtype":
        args["w_hh"] = args["w_hh"].double()
    else:
        raise AssertionError(mutation)
    return args


def _fused_forward_op(backend):
    if backend == "triton":
        from fastlstm.lstm.triton import recurrence as module
    else:
        from fastlstm.lstm import ops as module
    return module.recurrence_forward


def _call(op, args):
    return op(args["xg"], args["batch_sizes"], args["h0"], args["c0"], args["w_hh"],
              args["w_hr"], args["reverse"], args["save"])


def test_op_fuzz_baseline_is_valid():
    """The unmutated arguments are valid: the specification runs them."""
    from fastlstm.lstm.recurrence import reference_recurrence_forward
    generator = torch.Generator().manual_seed(0)
    for packed in (False, True):
        for proj in (0, 2):
            args = _op_args(3, 2, 4, proj, packed, generator)
            out, h_n, c_n, gates, cells = _call(reference_recurrence_forward, args)
            assert out.shape == (args["xg"].shape[0], proj or 4)


@pytest.mark.parametrize("mutation", OP_MUTATIONS)
@pytest.mark.parametrize("backend", [b for b in _backends_for("cpu") if b.values[0] != "torch"])
def test_fused_op_rejects_bad_arguments(backend, mutation):
    op = _fused_forward_op(backend)
    max_size = _MAX_SIZE[backend]

    @settings(max_examples=3, **_SETTINGS)
    @given(steps=st.integers(1, max_size), batch=st.integers(1, 3),
           hidden=st.integers(1, max_size), packed=st.booleans(), with_proj=st.booleans(),
           seed=st.integers(0, 2 ** 16))
    def check(steps, batch, hidden, packed, with_proj, seed):
        proj = max(hidden - 1, 1) if with_proj or mutation == "w_hr_shape" else 0
        if mutation in ("xg_rows", "batch_sizes_increase"):
            # One more dense row is one more step when batch == 1, and equal batch sizes of 1
            # never increase: both need batch >= 2 to be invalid.
            batch = max(batch, 2)
        args = _op_args(steps, batch, hidden, proj, packed, torch.Generator().manual_seed(seed))
        with pytest.raises((RuntimeError, ValueError, TypeError, IndexError)):
            _call(op, _mutate(args, mutation))

    check()
