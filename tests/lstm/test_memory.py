"""Training memory: no more than nn.LSTM's for the same shapes, and no growth over many steps.

The CPU allocator keeps no peak counter, so memory is measured two deterministic ways:
- activation memory: the bytes of the distinct storages autograd saves for backward
  (saved_tensors_hooks), parameters included on both sides;
- peak live tensor bytes over forward + backward: a dispatch mode sees every op's outputs and
  counts each storage until it is freed. Scratch memory a fused kernel allocates and frees
  inside one op is not seen; everything it returns or saves is.
"""
import gc
import os
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastlstm

from helpers import backend_params as _backends_for  # noqa: E402


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live storages created by ops run under this mode."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live = {}

    def _release(self, key):
        self.current -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._live or storage.nbytes() == 0:
                continue  # a view of a storage already counted
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def _storage_identity_is_preserved():
    tensor = torch.zeros(4)
    first = tensor.untyped_storage()
    first_id = id(first)
    del first
    return id(tensor.untyped_storage()) == first_id


def _sizes(backend):
    if backend == "triton":
        return [(4, 2, 3, 8)]
    return [(20, 4, 16, 32), (40, 8, 24, 48)]


def _pair(backend, input_size, hidden, device="cpu", **kwargs):
    reference = nn.LSTM(input_size, hidden, num_layers=2, device=device, **kwargs)
    fast = fastlstm.LSTM(input_size, hidden, num_layers=2, device=device, backend=backend,
                         **kwargs)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _train_step(module, x):
    out, (h, c) = module(x)
    (out.sum() + h.sum() + c.sum()).backward()


def _saved_bytes(module, x):
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, (h, c) = module(x)
    return sum(storages.values())


def _peak_bytes(module, x):
    mode = LiveTensorBytes()
    with mode:
        _train_step(module, x)
    return mode.peak


@pytest.mark.parametrize("backend", _backends_for("cpu"))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_activation_memory_not_above_nn_lstm(backend, bidirectional):
    for steps, batch, input_size, hidden in _sizes(backend):
        reference, fast = _pair(backend, input_size, hidden, bidirectional=bidirectional)
        x = torch.randn(steps, batch, input_size, requires_grad=True)
        reference_bytes, fast_bytes = _saved_bytes(reference, x), _saved_bytes(fast, x)
        assert fast_bytes <= reference_bytes, (
            f"T={steps} B={batch} H={hidden}: saves {fast_bytes} bytes, nn.LSTM {reference_bytes}")


@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_peak_training_memory_not_above_nn_lstm(backend):
    if not _storage_identity_is_preserved():
        pytest.skip("this torch does not keep one Python object per storage, which the "
                    "live-bytes count relies on")
    for steps, batch, input_size, hidden in _sizes(backend):
        reference, fast = _pair(backend, input_size, hidden)
        x = torch.randn(steps, batch, input_size, requires_grad=True)
        reference_peak = _peak_bytes(reference, x)
        x.grad = None
        fast_peak = _peak_bytes(fast, x)
        assert fast_peak <= reference_peak, (
            f"T={steps} B={batch} H={hidden}: peak {fast_peak} bytes, nn.LSTM {reference_peak}")


def test_live_bytes_counter_sees_frees():
    """The meter itself: a freed temporary does not count toward the end total."""
    mode = LiveTensorBytes()
    with mode:
        kept = torch.ones(1000)
        temporary = kept * 2
        del temporary
        gc.collect()
    assert mode.peak >= 8000 and mode.current == 4000
    del kept


def _rss_bytes():
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _live_tensor_count():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.fixture
def one_thread():
    # Small GEMMs split over threads on a busy machine run 30x slower than on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", _backends_for("cpu"))
def test_no_growth_over_training_steps(backend, one_thread):
    # 1,000 steps, except on the Triton interpreter, which runs every kernel program in Python
    # (a third of a second a step): there the live-tensor count over 40 steps is the check.
    total_steps = 40 if backend == "triton" else 1000
    # Big enough that leaking one step's gate buffers (xg: rows x 4H floats, 32 KiB a layer
    # here) would grow RSS by far more than the bound below over the steps measured.
    input_size, hidden, steps, batch = (3, 4, 3, 2) if backend == "triton" else (32, 64, 4, 8)
    torch.manual_seed(0)
    model = fastlstm.LSTM(input_size, hidden, num_layers=2, backend=backend)
    head = nn.Linear(hidden, 2)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01,
                                momentum=0.9)
    x = torch.randn(steps, batch, input_size)
    target = torch.randn(steps, batch, 2)
    checkpoints = {}
    for step in range(total_steps):
        optimizer.zero_grad(set_to_none=True)
        out, _state = model(x)
        loss = nn.functional.mse_loss(head(out), target)
        loss.backward()
        optimizer.step()
        if step in (total_steps // 10, total_steps - 1):
            checkpoints[step] = (_live_tensor_count(), _rss_bytes())
    (early_tensors, early_rss), (late_tensors, late_rss) = checkpoints.values()
    assert late_tensors == early_tensors, f"live tensors grew {early_tensors} -> {late_tensors}"
    if early_rss is not None:
        # RSS also sees memory that is not a Python-visible tensor (buffers a kernel allocates
        # and never frees); allocator caching makes it noisy by a few MiB.
        growth = late_rss - early_rss
        assert growth < 16 * 2 ** 20, f"RSS grew {growth / 2 ** 20:.1f} MiB"
    assert torch.isfinite(loss)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _backends_for("cuda"))
def test_cuda_peak_training_memory_not_above_nn_lstm(backend):
    for steps, batch, input_size, hidden in [(64, 16, 128, 256), (256, 4, 64, 512)]:
        reference, fast = _pair(backend, input_size, hidden, device="cuda")
        x = torch.randn(steps, batch, input_size, device="cuda", requires_grad=True)
        peaks = []
        for module in (reference, fast):
            _train_step(module, x)  # warm up: workspaces, cuBLAS handles
            module.zero_grad(set_to_none=True)
            x.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _train_step(module, x)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            module.zero_grad(set_to_none=True)
            x.grad = None
        assert peaks[1] <= peaks[0], f"T={steps} H={hidden}: peak {peaks[1]}, nn.LSTM {peaks[0]}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _backends_for("cuda"))
def test_cuda_no_growth_over_training_steps(backend):
    model = fastlstm.LSTM(32, 64, num_layers=2, device="cuda", backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 8, 32, device="cuda")
    allocated = []
    for step in range(1000):
        optimizer.zero_grad(set_to_none=True)
        out, _ = model(x)
        out.square().mean().backward()
        optimizer.step()
        if step in (100, 999):
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
    assert allocated[1] <= allocated[0], allocated
