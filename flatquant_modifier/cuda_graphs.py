"""
Replay a decoder layer's training or evaluation step as a CUDA graph.

A FlatQuant step of a small layer launches about a thousand small kernels (the four
transforms, their inverses, the fake quantizers, the layer, the backward): on a GPU
the host cannot launch them as fast as the GPU runs them. Capturing the step once per
input signature and replaying it removes that launch cost. Written here because
neither llm-compressor nor compressed-tensors captures graphs; ``torch.compile``'s
``reduce-overhead`` mode would, at the price of a compilation per run.

The captured function must be a pure function of its tensor inputs and of tensors
whose storage does not move between replays (module parameters updated in place by
the optimizer); it must not synchronise with the host.
"""

from typing import Any, Callable, Hashable

import torch
from loguru import logger
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["StepGraphs"]

# non-tensor arguments that may be part of a graph's signature
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, outputs: Any):
        self.graph = graph
        self.inputs = inputs  # static tensors, in the order of the flattened leaves
        self.outputs = outputs


class StepGraphs:
    """
    Runs ``fn(*args)`` through CUDA graphs, one per signature of ``args`` (shapes,
    dtypes and strides of the tensor leaves, values of the plain ones) and ``tag``.
    A new signature is warmed up eagerly on a side stream, then captured; later calls
    copy their tensors into the graph's static inputs and replay it. The outputs are
    the graph's static tensors: overwritten by the next replay of any graph here (the
    graphs share one memory pool), so use them before the next call.

    Falls back to calling ``fn`` eagerly when disabled, when an argument is not a
    tensor on the graphs' device or a plain value (with a warning, once per reason),
    and, after a warning, for good once a capture failed.
    """

    def __init__(self, device: torch.device, enabled: bool = True, warmup: int = 2):
        device = torch.device(device)
        self.enabled = bool(enabled) and device.type == "cuda"
        if self.enabled and device.index is None:  # tensors report "cuda:<index>"
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.warmup = warmup
        self._graphs: dict[Hashable, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self._eager_reasons: set[str] = set()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, tag: Hashable, fn: Callable, *args) -> Any:
        if not self.enabled:
            return fn(*args)
        leaves, spec = tree_flatten(args)
        key = self._signature(tag, leaves)
        if isinstance(key, str):  # an argument a graph cannot take: run eagerly
            if key not in self._eager_reasons:
                self._eager_reasons.add(key)
                logger.warning(f"FlatQuant: no CUDA graph for this step ({key}); eager")
            return fn(*args)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(fn, leaves, spec)
            except Exception as error:  # capture is an optimisation: never fatal
                logger.warning(
                    f"FlatQuant: capturing the training step as a CUDA graph failed "
                    f"({type(error).__name__}: {error}); continuing without CUDA graphs"
                )
                self.close()
                torch.cuda.synchronize(self.device)
                return fn(*args)
            self._graphs[key] = captured
        for static, leaf in zip(captured.inputs, leaves):
            if isinstance(static, torch.Tensor) and static.data_ptr() != leaf.data_ptr():
                static.copy_(leaf, non_blocking=True)
        captured.graph.replay()
        return captured.outputs

    def close(self):
        """Free the graphs and their memory; later calls run eagerly."""
        self._graphs.clear()
        self._pool = None
        self.enabled = False

    def _signature(self, tag: Hashable, leaves: list) -> tuple | str:
        """The graph key of these arguments, or why they cannot be graphed."""
        parts: list = [tag]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != self.device:
                    return f"a tensor on {leaf.device}, the graphs run on {self.device}"
                parts.append(("t", tuple(leaf.shape), leaf.dtype, leaf.stride(),
                              leaf.requires_grad))
            elif isinstance(leaf, _PLAIN):
                parts.append(("v", type(leaf), leaf))
            else:
                return f"an argument of type {type(leaf).__name__}"
        return tuple(parts)

    def _capture(self, fn: Callable, leaves: list, spec) -> _Captured:
        inputs = [
            leaf.detach().clone().requires_grad_(leaf.requires_grad)
            if isinstance(leaf, torch.Tensor) else leaf
            for leaf in leaves
        ]
        args = tree_unflatten(inputs, spec)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # library handles, workspaces, autograd state
                fn(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*args)
        return _Captured(graph, inputs, outputs)
