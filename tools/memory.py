"""How much memory a training step needs, traced without computing anything. tools/bench.py reports
it; the tests check the blocks' saved bytes with it."""

import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from architecture import FaceNN


class LiveMemory(TorchDispatchMode):
    """Bytes of all tensor storages alive, and their peak, as operators run. Under FakeTensorMode
    storages have sizes but no data, so a training step at any batch size costs only the time to
    trace it. A storage counts from the operator that creates it until Python frees it (autograd's
    saved tensors keep it alive until backward)."""

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()
        for tensor in tensors:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage._cdata in self.storages:
            return  # a view or an in-place result
        self.storages.add(storage._cdata)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, storage._cdata, storage.nbytes())

    def _free(self, key: int, nbytes: int):
        self.storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out


def estimated_training_memory(batch_size: int, image_size: int, num_classes: int, **architecture) -> int:
    """Peak bytes of FaceNN's training step under 16-mixed: parameters, gradients and AdamW's two
    states (fp32), the fp16 copies of the weights, every activation autograd saves and every
    temporary, over two steps (the second starts with AdamW's state in place). CPU autocast stands
    in for CUDA's: both run convolutions and linear layers in fp16, and batch norm, GELU, ReLU6 and
    max-pool in their input's dtype. Not counted: the CUDA context, cuDNN workspaces and the caching
    allocator's slack."""
    with FakeTensorMode():
        model = FaceNN(num_classes, **architecture)  # the weights' layout does not change their bytes
        images = torch.empty(batch_size, 3, image_size, image_size, memory_format=torch.channels_last)
        labels = torch.zeros(batch_size, dtype=torch.long)
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        with LiveMemory(*model.parameters(), *model.buffers(), images, labels) as memory:
            for _ in range(2):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", torch.float16):
                    loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
    return memory.peak
