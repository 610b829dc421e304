"""DistributedDataParallel: two gloo processes give the gradients of one process on the whole batch.

One spawn of two workers checks every backend (starting processes is the slow part); each worker
writes its rank's gradients, and the tests compare them with a single-process run here.
"""
import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm

_BACKEND_MODULES = {"triton": "fastlstm.lstm.triton.recurrence", "cpu": "fastlstm.lstm.ops",
                    "cuda": "fastlstm.lstm.ops"}


def _runnable_backends():
    names = []
    for name in fastlstm.available_backends("cpu"):
        module = _BACKEND_MODULES.get(name)
        if module is None or importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


WORLD_SIZE = 2


def _sizes(backend):
    if backend == "triton":  # the interpreter is slow
        return dict(batch=4, steps=3, input_size=3, hidden=4)
    return dict(batch=6, steps=5, input_size=4, hidden=8)


class Classifier(nn.Module):
    def __init__(self, sizes, backend):
        super().__init__()
        self.lstm = fastlstm.LSTM(sizes["input_size"], sizes["hidden"], num_layers=2,
                                  bidirectional=True, batch_first=True, backend=backend)
        self.head = nn.Linear(2 * sizes["hidden"], 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _c) = self.lstm(packed)
        return self.head(torch.cat([h[-2], h[-1]], 1))


def _data(backend):
    sizes = _sizes(backend)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["batch"], sizes["steps"], sizes["input_size"], generator=generator)
    lengths = torch.randint(1, sizes["steps"] + 1, (sizes["batch"],), generator=generator)
    target = torch.randint(0, 3, (sizes["batch"],), generator=generator)
    return sizes, x, lengths, target


def _model(backend, sizes):
    torch.manual_seed(2)
    return Classifier(sizes, backend)


def _gradients(model, x, lengths, target):
    loss = nn.functional.cross_entropy(model(x, lengths), target)  # mean over the batch
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank, port, backends, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        results = {}
        for backend in backends:
            sizes, x, lengths, target = _data(backend)
            shard = slice(rank * sizes["batch"] // WORLD_SIZE,
                          (rank + 1) * sizes["batch"] // WORLD_SIZE)
            model = nn.parallel.DistributedDataParallel(_model(backend, sizes))
            grads = _gradients(model, x[shard], lengths[shard], target[shard])
            # DDP names parameters "module.<name>"; keep the inner module's names.
            results[backend] = {name.removeprefix("module."): g for name, g in grads.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    backends = _runnable_backends()
    mp.spawn(_worker, args=(_free_port(), backends, out_dir), nprocs=WORLD_SIZE, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("backend", fastlstm.available_backends("cpu"))
def test_ddp_matches_single_process(ddp_gradients, backend):
    module = _BACKEND_MODULES.get(backend)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"backend {backend}: {module} is not part of this build")
    sizes, x, lengths, target = _data(backend)
    expected = _gradients(_model(backend, sizes), x, lengths, target)
    for rank, per_rank in enumerate(ddp_gradients):
        got = per_rank[backend]
        assert got.keys() == expected.keys()
        for name in expected:
            # All-reduce averages the two half-batch means: the same sum in another order.
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"rank {rank}, grad of {name}: {m}")
    # Both ranks hold the same (all-reduced) gradients bit for bit.
    for name in expected:
        assert torch.equal(ddp_gradients[0][backend][name], ddp_gradients[1][backend][name]), name
