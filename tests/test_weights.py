"""read_weights: safetensors and tensors-only .pth files, clear errors otherwise."""

import pytest
import torch
from safetensors.torch import save_file

from kdinpaint.weights import read_weights


def test_reads_both_formats_and_refuses_the_rest(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3)}
    save_file(state, str(tmp_path / "a.safetensors"))
    torch.save({"generator": state}, tmp_path / "b.pth")
    assert torch.equal(read_weights(tmp_path / "a.safetensors")["w"], state["w"])
    assert torch.equal(read_weights(tmp_path / "b.pth")["generator"]["w"], state["w"])
    with pytest.raises(FileNotFoundError, match="no EdgeConnect checkpoint at"):
        read_weights(tmp_path / "missing.pth", "EdgeConnect checkpoint")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list"):
        read_weights(tmp_path / "list.pth")

    class Evil:  # pickled code must never run: weights_only refuses arbitrary classes
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="tensors-only"):
        read_weights(tmp_path / "evil.pth")
