"""Where an edited module's weight lives, and how to read and write its values.

A model dispatched by ``accelerate`` (``device_map``, ``cpu_offload``, ``disk_offload``,
``from_pretrained(..., device_map=..., offload_folder=...)``) keeps an offloaded module's
weight as a **meta** tensor; an ``AlignDevicesHook(offload=True)`` on the module (or on an
ancestor, ``place_submodules=True``) loads the real values from its ``weights_map`` before each
forward and drops them after. Editing such a module means reading and writing the values in that
map, where the hook loads them, so the edit holds in every later forward and in
``save_pretrained`` (which reads offloaded weights through the same map).

:func:`weight_slots` maps every edited module to a :class:`WeightSlot`:

=========  ====================================================  ==============================
kind       where the values are                                  how a write lands
=========  ====================================================  ==============================
module     ``module.weight`` (any device)                        in place
cpu        a CPU tensor of the hook's map (``cpu_offload``, or    in place (``read()`` is the
           ``OffloadedWeightsLoader.state_dict``)                 stored tensor)
disk       a ``<key>.dat`` memory-mapped file in the offload      a new file replaces it
           folder (``offload_state_dict`` / ``dispatch_model``)   (written, then renamed over it)
disk       a tensor of the original safetensors checkpoint        never into the checkpoint: a
           (``from_pretrained`` with ``offload_folder``)          ``.dat`` in the offload folder
                                                                  takes the key over (or, without
                                                                  a folder, a CPU tensor of the
                                                                  loader's ``state_dict``)
=========  ====================================================  ==============================

A placement that cannot be edited raises :class:`PlacementError` from :func:`weight_slots`,
before anything is read or changed: a meta weight no offload hook provides, a map of an unknown
type, quantized or float8 weights (no precision to hold an update).

Equivalent code for one disk-offloaded weight (``key`` = ``"<module>.weight"``)::

    loader = module._hf_hook.weights_map.dataset           # OffloadedWeightsLoader
    w = loader[key]                                         # real values (a CPU copy)
    w += delta
    accelerate.utils.offload_weight(w, key, tmp, index=loader.index)   # then os.replace into
                                                                        # loader.save_folder
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["PlacementError", "WeightSlot", "weight_slots", "offload_store", "execution_device",
           "tensor_values"]


class PlacementError(ValueError):
    """An edited module's weight lives where the editor cannot read or write it."""


def _offload_hooks(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])  # SequentialHook chains hooks
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None)
            is not None]


def _unwrap(weights_map) -> Tuple[object, str]:
    """``(underlying mapping, key prefix)`` of a (nested) ``PrefixedDataset``."""
    prefix = ""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        prefix = weights_map.prefix + prefix  # outer[k] = inner[outer.prefix + k]
        weights_map = weights_map.dataset
    return weights_map, prefix


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device an accelerate hook runs ``module`` on (None without such a hook)."""
    hook = getattr(module, "_hf_hook", None)
    for h in list(getattr(hook, "hooks", None) or ([hook] if hook is not None else [])):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return None


def offload_store(model: nn.Module, name: str, tensor: str = "weight"):
    """``(mapping, key, hook's execution device)`` holding ``<name>.<tensor>`` of an offloaded
    module: the nearest module on the path to ``name`` with an offload hook; None if none has."""
    parts = name.split(".") if name else []
    for cut in range(len(parts), -1, -1):
        parent = ".".join(parts[:cut])
        module = model.get_submodule(parent)
        for hook in _offload_hooks(module):
            rel = ".".join(parts[cut:] + [tensor])
            mapping, prefix = _unwrap(hook.weights_map)
            dev = getattr(hook, "execution_device", None)
            dev = None if dev is None else torch.device(dev if not isinstance(dev, int)
                                                        else f"cuda:{dev}")
            return mapping, prefix + rel, dev
    return None


def tensor_values(model: nn.Module, qualified: str, t: torch.Tensor) -> torch.Tensor:
    """The values of the parameter or buffer ``qualified`` (``t`` itself unless it is an
    offloaded meta tensor, then what its offload hook loads); PlacementError if none does."""
    if t.device.type != "meta":
        return t
    module, _, tensor = qualified.rpartition(".")
    found = offload_store(model, module, tensor)
    if found is None:
        raise PlacementError(f"{qualified!r} is a meta tensor that no accelerate offload hook "
                             f"provides")
    return found[0][found[1]]


class WeightSlot:
    """One edited module's weight values: :meth:`read` them, :meth:`write` new ones.

    ``kind``: ``"module"``, ``"cpu"`` or ``"disk"`` (module docstring); ``live``: in-place
    changes of :meth:`read`'s tensor are the weight itself (else :meth:`write` must follow);
    ``device``: where :meth:`read`'s values are; ``execution_device``: where the module computes.
    """

    def __init__(self, module: nn.Module, name: str, kind: str = "module", mapping=None,
                 key: Optional[str] = None, exec_device: Optional[torch.device] = None):
        self.module, self.name, self.kind = module, name, kind
        self.mapping, self.key = mapping, key
        w = module.weight
        self.shape, self.dtype = tuple(w.shape), w.dtype
        self.execution_device = exec_device if exec_device is not None else w.device
        self.device = w.device if kind == "module" else torch.device("cpu")

    @property
    def live(self) -> bool:
        return self.kind != "disk"

    def read(self) -> torch.Tensor:
        """The weight's values (``module.weight.data`` itself unless offloaded)."""
        if self.kind == "module":
            return self.module.weight.data
        if self.kind == "cpu":
            return self._cpu_dict()[self.key]
        return self.mapping[self.key]

    def write(self, value: torch.Tensor) -> None:
        """Make ``value`` (the weight's shape and dtype) the weight: in place, or where the
        offload hook loads it from."""
        if tuple(value.shape) != self.shape or value.dtype != self.dtype:
            raise ValueError(f"module {self.name!r}: cannot write a {tuple(value.shape)} "
                             f"{value.dtype} tensor into a {self.shape} {self.dtype} weight")
        with torch.no_grad():
            if self.kind != "disk":
                target = self.read()
                if value.data_ptr() != target.data_ptr():
                    target.copy_(value)
                return
            loader = self.mapping
            if getattr(loader, "save_folder", None):
                _write_dat(loader, self.key, value.detach().cpu().contiguous())
            else:  # no folder of its own: the loader serves an in-memory copy (never the checkpoint)
                loader.state_dict[self.key] = value.detach().cpu().clone()
                self.kind = "cpu"

    def _cpu_dict(self):
        m = self.mapping
        return m if isinstance(m, dict) else m.state_dict

    def __repr__(self) -> str:
        return f"WeightSlot({self.name!r}, kind={self.kind!r}, {self.shape}, {self.dtype})"


def _write_dat(loader, key: str, value: torch.Tensor) -> None:
    """``<save_folder>/<key>.dat`` := ``value`` (accelerate's memmap format) by writing a new
    file and renaming it over the old one: a reader never sees a half-written file, and a
    memory map still open on the old file keeps its pages."""
    import os
    import tempfile

    from accelerate.utils import offload_weight

    folder = loader.save_folder
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ultraedit-") as tmp:
        index: Dict[str, dict] = {}
        offload_weight(value, key, tmp, index=index)
        os.replace(os.path.join(tmp, f"{key}.dat"), os.path.join(folder, f"{key}.dat"))
    loader.index[key] = index[key]


def _slot(model: nn.Module, name: str, module: nn.Module) -> WeightSlot:
    w = module.weight
    if w.dtype.is_floating_point is False or "float8" in str(w.dtype):
        raise PlacementError(
            f"module {name!r} has {str(w.dtype).replace('torch.', '')} weights (quantized or "
            f"float8): they cannot hold an edit; load the model in float32/bfloat16/float16 "
            f"(no quantization_config) to edit it")
    if w.device.type != "meta":
        return WeightSlot(module, name)
    found = offload_store(model, name)
    if found is None:
        raise PlacementError(
            f"module {name!r} has a meta weight and no accelerate offload hook provides its "
            f"values (a model built on the meta device and never loaded?); load its weights, or "
            f"dispatch it with accelerate (device_map / cpu_offload / disk_offload)")
    mapping, key, dev = found
    if isinstance(mapping, dict):
        if key not in mapping or not isinstance(mapping[key], torch.Tensor):
            raise PlacementError(f"module {name!r}: the offload hook's weights map has no "
                                 f"tensor {key!r}")
        kind = "cpu"
    elif hasattr(mapping, "index") and hasattr(mapping, "state_dict"):  # OffloadedWeightsLoader
        if key in mapping.state_dict:
            kind = "cpu"
        elif key in mapping.index:
            kind = "disk"
        else:
            raise PlacementError(f"module {name!r}: the offload hook's weights map has no "
                                 f"{key!r}")
    else:
        raise PlacementError(
            f"module {name!r} is offloaded through a {type(mapping).__name__} weights map, which "
            f"the editor cannot write (known: a dict of CPU tensors, accelerate's "
            f"OffloadedWeightsLoader)")
    slot = WeightSlot(module, name, kind, mapping, key, dev)
    stored = mapping[key] if kind == "cpu" else None
    if stored is not None and (tuple(stored.shape) != slot.shape or stored.device.type != "cpu"):
        raise PlacementError(f"module {name!r}: its offloaded weight {key!r} is a "
                             f"{tuple(stored.shape)} tensor on {stored.device}, expected "
                             f"{slot.shape} on the CPU")
    if stored is not None and stored.dtype != slot.dtype:
        raise PlacementError(f"module {name!r}: its offloaded weight is {stored.dtype}, the "
                             f"module's {slot.dtype}")
    return slot


def weight_slots(model: nn.Module, modules: Dict[str, nn.Module]) -> Dict[str, WeightSlot]:
    """``{name: WeightSlot}`` for the edited ``modules``; :class:`PlacementError` (before
    anything is read or written) for a placement that cannot be edited."""
    return {name: _slot(model, name, module) for name, module in modules.items()}
