"""GPU-only: a kNN model's state made on "cuda" and on "cuda:0" passes the same compiled graphs.

The race's compile warm-up made its state on the trainer's device, torch.device("cuda"); the
trainer's own state took the model's, "cuda:0". The stores kept the name they were given, a
compiled forward guards on it, and the first training step recompiled the whole model after
the clock had started (92 s of a 10-minute race). Stores now take their tensors' device.
"""

import pytest
import torch

import memlm
from memlm.memory.knn.stores import ExactStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_store_takes_its_tensors_device():
    here = torch.device("cuda", torch.cuda.current_device())
    assert ExactStore(2, 1, 8, 16, device="cuda").device == here
    assert ExactStore(2, 1, 8, 16, device=here).device == here


def test_states_made_on_either_name_share_the_compiled_graphs():
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = memlm.build("seed-tiny", layers=2, seq_len=16, **{"memory.knn.layers": [1], "memory.knn.k": 4,
                                                              "memory.knn.capacity": 64,
                                                              "memory.xl.length": 16}).cuda()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch._dynamo.reset()
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    for device in ("cuda", None):  # None: the model's device, "cuda:0"
        state = model.init_state(2, device=device)
        for _ in range(3):
            state = compiled(ids, state=state).state.detach()
        if device == "cuda":
            frames = counter.frame_count
    assert counter.frame_count == frames
