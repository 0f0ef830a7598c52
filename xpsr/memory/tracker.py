"""Live tensor bytes over time, by category and by module: a TorchDispatchMode of our own.

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: as shipped it installs a gradient hook on every
parameter it meets (it fails on our frozen UNet/VAE/text encoder) and refuses a module that runs twice in one
tracked region (our ControlNet residuals, gradient-checkpoint recomputation, the tiled VAE run the same
modules many times). The counting itself is small: every aten op's outputs are looked at once; a storage not
seen before is added with the current category and module, and a ``weakref.finalize`` on the storage takes it
off when the last tensor using it dies. Views share their base's storage, so nothing is counted twice. The
same counter runs on fake tensors (the plan) and on real ones (to check the counting itself).

What it cannot see: memory a kernel allocates and frees inside one op without a tensor (workspaces), the
allocator's rounding and caching, and the CUDA context. Those are the GPU margins of docs/gpu-memory.md.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("parameters", "gradients", "optimizer_state", "inputs", "activations", "temporaries")


@dataclass
class Peak:
    """The instant of the highest live bytes: totals by category and by module, and where it happened."""

    bytes: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    phase: str = ""
    op: str = ""
    op_index: int = 0
    module: str = ""


def module_key(name: str, depth: int) -> str:
    """``controlnet.down_blocks.1.attentions.0...`` -> ``controlnet.down_blocks.1`` at depth 3."""
    return ".".join(name.split(".")[:depth]) if name else "(none)"


def _run(func, args, kwargs):
    """Run ``func``; under a fake mode, an op whose tensor inputs are all real (scheduler timesteps and
    alphas, token ids) runs for real, so that code reading a value from it (``int(t)``) works as on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
        with unset_fake_temporarily():
            return func(*args, **kwargs)
    return func(*args, **kwargs)


def _cost(func, args, kwargs, out) -> tuple[int, int, bool]:
    """(FLOPs as torch's FlopCounterMode counts them, bytes of the op's tensor inputs and outputs, whether
    it computes in half precision): the inputs of a roofline estimate. Views move no bytes."""
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    flops = 0
    if packet in flop_registry:
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
    if func.is_view:
        return flops, 0, False
    tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
    moved = sum(t.numel() * t.element_size() for t in tensors)
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    return flops, moved, half


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages; ``phase(...)`` names the stage of the step being run.

    Storages made in a phase get its category (``forward`` -> activations, anything else -> temporaries)
    unless :meth:`register` or :meth:`retag` says otherwise (parameters, gradients, optimizer state)."""

    def __init__(self, module_depth: int = 3):
        super().__init__()
        self.depth = module_depth
        self.live = 0
        self.by_category: Counter = Counter()
        self.by_module: Counter = Counter()
        self.entries: dict[int, list] = {}  # id(storage) -> [nbytes, category, module]
        self.peak = Peak()
        self.phase_name = "setup"
        self.phase_peaks: dict[str, int] = {}
        self.op_index = 0
        self.module_stack: list[str] = []
        self.names: dict[int, str] = {}  # id(module) -> qualified name, for the module stack
        self.costs: list[tuple[int, int, bool]] | None = None  # (FLOPs, bytes read + written, half) per op

    # --- bookkeeping -------------------------------------------------------------------------------
    def _add(self, storage, category: str, module: str) -> None:
        key = id(storage)
        if key in self.entries:
            return
        nbytes = storage.nbytes()
        mod = module_key(module, self.depth)
        self.entries[key] = [nbytes, category, mod]
        self.live += nbytes
        self.by_category[category] += nbytes
        self.by_module[mod] += nbytes
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        nbytes, category, mod = entry
        self.live -= nbytes
        self.by_category[category] -= nbytes
        self.by_module[mod] -= nbytes

    def register(self, tensor: torch.Tensor, category: str, module: str = "") -> None:
        """Count a tensor made before tracking began (weights, optimizer state, the batch)."""
        self._add(tensor.untyped_storage(), category, module)
        self._note_peak("", "")

    def retag(self, tensor: torch.Tensor, category: str, module: str | None = None) -> None:
        """Move an already counted storage to another category (a new gradient, optimizer state)."""
        entry = self.entries.get(id(tensor.untyped_storage()))
        if entry is None:
            self.register(tensor, category, module or "")
            return
        nbytes, old, mod = entry
        self.by_category[old] -= nbytes
        self.by_category[category] += nbytes
        entry[1] = category
        if module is not None:
            new_mod = module_key(module, self.depth)
            self.by_module[mod] -= nbytes
            self.by_module[new_mod] += nbytes
            entry[2] = new_mod

    @contextlib.contextmanager
    def phase(self, name: str):
        """Name what runs inside (forward, backward, clip, optimizer, vae_decode, ...)."""
        before, self.phase_name = self.phase_name, name
        try:
            yield
        finally:
            self.phase_name = before

    def _note_peak(self, op: str, module: str) -> None:
        self.phase_peaks[self.phase_name] = max(self.phase_peaks.get(self.phase_name, 0), self.live)
        if self.live > self.peak.bytes:
            self.peak = Peak(self.live, {k: v for k, v in self.by_category.items() if v},
                             {k: v for k, v in self.by_module.items() if v}, self.phase_name, op, self.op_index,
                             module)

    # --- the dispatch mode -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _run(func, args, kwargs or {})
        self.op_index += 1
        module = self.module_stack[-1] if self.module_stack else ""
        if self.phase_name == "forward" or (self.module_stack and self.phase_name == "backward"):
            category = "activations"  # made by a module (in backward: a gradient-checkpoint recomputation)
        else:
            category = "temporaries"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage(), category, module or f"({self.phase_name})")
        self._note_peak(str(func), module)
        if self.costs is not None:
            self.costs.append(_cost(func, args, kwargs or {}, out))
        return out

    # --- modules -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def modules(self, **roots: torch.nn.Module):
        """Attribute allocations to the innermost running module of ``roots`` (named by their keywords)."""
        for root_name, root in roots.items():
            if root is None:
                continue
            for name, m in root.named_modules():
                self.names[id(m)] = f"{root_name}.{name}" if name else root_name

        def pre(module, args):
            name = self.names.get(id(module))
            if name is not None:
                self.module_stack.append(name)

        def post(module, args, output):
            if self.names.get(id(module)) is not None and self.module_stack:
                self.module_stack.pop()

        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.module_stack.clear()

    def register_module_weights(self, **roots: torch.nn.Module) -> None:
        """Count every parameter and buffer of ``roots`` as parameters, attributed to their modules."""
        for root_name, root in roots.items():
            if root is None:
                continue
            for name, p in list(root.named_parameters()) + list(root.named_buffers()):
                self.register(p, "parameters", f"{root_name}.{name}")

    def report(self) -> dict:
        """The peak as plain data (bytes)."""
        p = self.peak
        return {"peak_bytes": p.bytes, "by_category": dict(sorted(p.by_category.items(), key=lambda kv: -kv[1])),
                "by_module": dict(sorted(p.by_module.items(), key=lambda kv: -kv[1])),
                "peak_at": {"phase": p.phase, "op": p.op, "op_index": p.op_index, "module": p.module},
                "phase_peaks": dict(self.phase_peaks), "ops": self.op_index}
