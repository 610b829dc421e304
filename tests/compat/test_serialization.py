"""copy.deepcopy, pickle and torch.save/torch.load round-trip fastlstm modules and whole models,
and the backend setting survives."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fastlstm


class Model(nn.Module):
    def __init__(self, backend="torch"):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.lstm = fastlstm.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3,
                                  batch_first=True, backend=backend)
        self.cell = fastlstm.LSTMCell(6, 5, backend=backend)
        self.head = nn.Linear(5, 11)

    def forward(self, ids):
        out, (h, c) = self.lstm(self.embed(ids))
        cell_h, _cell_c = self.cell(out[:, -1])
        return self.head(cell_h)


def _modules():
    torch.manual_seed(0)
    return {
        "lstm": (fastlstm.LSTM(3, 5, num_layers=2, proj_size=2, backend="torch"),
                 torch.randn(4, 2, 3)),
        "cell": (fastlstm.LSTMCell(3, 5, bias=False, backend="torch"), torch.randn(2, 3)),
        "model": (Model(), torch.randint(0, 11, (2, 5))),
    }


def _outputs(module, x):
    out = module(x)
    return torch.utils._pytree.tree_leaves(out)


def _assert_same(original, restored, x):
    assert type(restored) is type(original)
    assert repr(restored) == repr(original)
    original_state, restored_state = original.state_dict(), restored.state_dict()
    assert list(restored_state) == list(original_state)
    for key in original_state:
        assert torch.equal(restored_state[key], original_state[key]), key
    for name, submodule in original.named_modules():
        if isinstance(submodule, (fastlstm.LSTM, fastlstm.LSTMCell)):
            assert restored.get_submodule(name).backend == submodule.backend, name
    for a, b in zip(_outputs(original, x), _outputs(restored, x)):
        assert torch.equal(a, b)


def _save_load(obj, **load_kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, **load_kwargs)


@pytest.mark.parametrize("name", ["lstm", "cell", "model"])
def test_deepcopy(name):
    module, x = _modules()[name]
    restored = copy.deepcopy(module)
    _assert_same(module, restored, x)
    # A deep copy owns its parameters.
    for p, q in zip(module.parameters(), restored.parameters()):
        assert p.data_ptr() != q.data_ptr()


@pytest.mark.parametrize("name", ["lstm", "cell", "model"])
def test_pickle(name):
    module, x = _modules()[name]
    _assert_same(module, pickle.loads(pickle.dumps(module)), x)


@pytest.mark.parametrize("name", ["lstm", "cell", "model"])
def test_torch_save_whole_module(name):
    module, x = _modules()[name]
    _assert_same(module, _save_load(module, weights_only=False), x)


def test_weights_only_load_of_whole_module_needs_allowlisting():
    """weights_only=True refuses unknown classes, as for any module; allowlisted, it loads."""
    module, x = _modules()["lstm"]
    with pytest.raises(pickle.UnpicklingError):
        _save_load(module, weights_only=True)
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        pytest.skip("torch.serialization.safe_globals needs torch 2.5")
    with safe_globals([fastlstm.LSTM, torch.nn.modules.rnn.LSTM]):
        try:
            restored = _save_load(module, weights_only=True)
        except pickle.UnpicklingError as error:
            # Only fastlstm's own classes are ours to allowlist; torch may need more of its own.
            assert "fastlstm" not in str(error), error
            pytest.skip(f"this torch needs more globals allowlisted: {error}")
    _assert_same(module, restored, x)


@pytest.mark.parametrize("name", ["lstm", "cell", "model"])
@pytest.mark.parametrize("weights_only", [True, False])
def test_state_dict_round_trip(name, weights_only):
    module, x = _modules()[name]
    state = _save_load(module.state_dict(), weights_only=weights_only)
    fresh = copy.deepcopy(module)
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(state)
    _assert_same(module, fresh, x)


def test_state_dict_interchangeable_with_nn_lstm():
    fast = fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, backend="torch")
    reference = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    reference.load_state_dict(_save_load(fast.state_dict(), weights_only=True))
    x = torch.randn(4, 2, 3)
    for a, b in zip(_outputs(fast, x), _outputs(reference, x)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    fast.load_state_dict(_save_load(nn.LSTM(3, 5, num_layers=2, bidirectional=True,
                                            proj_size=2).state_dict(), weights_only=True))


def test_converted_module_round_trips():
    model = nn.Sequential(nn.Linear(3, 3))
    model.add_module("lstm", nn.LSTM(3, 4))
    fastlstm.convert(model)
    restored = _save_load(model, weights_only=False)
    assert type(restored.lstm) is fastlstm.LSTM and restored.lstm.backend == "auto"
    copied = copy.deepcopy(model)
    assert type(copied.lstm) is fastlstm.LSTM


def test_backend_setting_survives_and_is_checked():
    module = fastlstm.LSTM(3, 4, backend="torch")
    for restored in (copy.deepcopy(module), pickle.loads(pickle.dumps(module)),
                     _save_load(module, weights_only=False)):
        assert restored.backend == "torch"
        assert "backend='torch'" in repr(restored)
    with pytest.raises(ValueError, match="backend"):
        fastlstm.LSTM(3, 4, backend="bogus")


@pytest.mark.cuda
def test_save_on_cuda_load_on_cpu():
    module = fastlstm.LSTM(3, 4, device="cuda", backend="auto")
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, map_location="cpu", weights_only=False)
    assert next(restored.parameters()).device.type == "cpu"
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(restored(x)[0], module(x.cuda())[0].cpu(), atol=1e-5, rtol=1e-5)
