"""
The model in memory after ``oneshot`` computes what is saved, wherever its weights
live (compressed-tensors offloading: on the GPU, in CPU memory onloaded to the GPU
layer by layer, on disk).

compressed-tensors' quantized forward (``set_forward_quantized``, compressed-tensors
0.19) fake-quantizes a weight by patching ``.data`` of the tensor it onloaded and then
calls ``Linear.forward``, which reads ``self.weight`` a second time. A module whose
weights stay where they are used (everything on the CPU, or everything on the GPU)
returns the same tensor both times. A module offloaded to the CPU or to disk and run
on a GPU, as llm-compressor's sequential pipeline leaves a model that was loaded on
the CPU, onloads a fresh, unquantized copy at the second read: outside the pipeline's
``disable_offloading`` such a model runs its linears with full-precision weights while
every checkpoint of it holds them quantized. :func:`hold_weights_during_forward` runs
each quantized forward with its module's onloaded tensors held for the call.
"""

from compressed_tensors.offload import OffloadCache, disable_offloading, unwrap_offload_forward
from torch import nn

__all__ = ["hold_weights_during_forward"]

def hold_weights_during_forward(model: nn.Module) -> int:
    """
    Make the quantized forward of every module with a compressed-tensors quantization
    scheme read one onloaded copy of its tensors per call (see the module docstring).
    The wrapper sits under compressed-tensors' offload wrapper, so it survives
    re-dispatching (``remove_dispatch`` / ``dispatch_model``); for modules that are not
    offloaded it only checks a type. Idempotent.

    :return: number of modules wrapped by this call
    """
    wrapped = 0
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        with unwrap_offload_forward(module):
            forward = module.forward.__func__
            if getattr(forward, "holds_weights", False):
                continue

            def held(self, *args, _forward=forward, **kwargs):
                if isinstance(self._parameters, OffloadCache):
                    with disable_offloading():
                        return _forward(self, *args, **kwargs)
                return _forward(self, *args, **kwargs)

            # compressed-tensors' clear_quantization unwraps one level through
            # ``__wrapped__``: it must land on the plain forward, as before
            held.__wrapped__ = getattr(forward, "__wrapped__", forward)
            held.holds_weights = True
            module.forward = held.__get__(module)
        wrapped += 1
    return wrapped
