"""The small helpers' one home: `restoring` (both tensor sets), `model_device`, `left_pad` of tensors."""

import pytest
import torch

from trl_refine.utils import left_pad, local_tensor, model_device, restoring


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trained = torch.nn.Linear(2, 2)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
        self.register_buffer("kept", torch.zeros(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _bump(net: _Net) -> None:
    net.train()
    with torch.no_grad():
        for t in [*net.parameters(), net.kept, net.scratch]:
            t.add_(1.0)


@pytest.mark.parametrize("tensors", ["state_dict", "trainable", "none"])
def test_restoring_puts_back_its_tensors_in_place_and_the_train_flag(tensors):
    net = _Net().eval()
    before = {n: t.clone() for n, t in [*net.named_parameters(), *net.named_buffers()]}
    storage = {n: t.data_ptr() for n, t in [*net.named_parameters(), *net.named_buffers()]}
    with restoring(net, tensors):
        _bump(net)
    assert not net.training
    restored = {
        "state_dict": {"trained.weight", "trained.bias", "frozen.weight", "frozen.bias", "kept"},
        "trainable": {"trained.weight", "trained.bias", "kept", "scratch"},
        "none": set(),
    }[tensors]
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        assert t.data_ptr() == storage[name], name
        assert torch.equal(t, before[name]) == (name in restored), name


def test_restoring_rejects_an_unknown_tensor_set():
    with (
        pytest.raises(ValueError, match="tensors='all' is not one of state_dict, trainable, none"),
        restoring(_Net(), "all"),
    ):
        pass


def test_model_device_and_local_tensor():
    assert model_device(_Net()) == torch.device("cpu")
    assert model_device(torch.nn.Module()) == torch.device("cpu")  # no parameters

    class Shard:
        def to_local(self):
            return "local"

    assert local_tensor(Shard()) == "local"
    t = torch.ones(1)
    assert local_tensor(t) is t


def test_left_pad_takes_tensors_and_lists_alike():
    a = left_pad([torch.tensor([3, 4]), torch.tensor([5])], 0)
    b = left_pad([[3, 4], (5,)], 0)
    assert a.input_ids.tolist() == b.input_ids.tolist() == [[3, 4], [0, 5]]
    assert a.attention_mask.tolist() == b.attention_mask.tolist() == [[1, 1], [0, 1]]
