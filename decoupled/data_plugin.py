"""A dataset plug-in (decoupled/plugins.py): `load(cfg, seed)` from user code returns
`(train, test, num_classes)`, each set either a pair of tensors `(x, y)` or a torch Dataset of `(x, y)`
samples; `cfg` is the [data] section (its free-form [data.args] table included). The sets are turned
into the in-memory tensors every built-in dataset is (data.py), then normalised and batched alike."""
from __future__ import annotations

import torch

from .plugins import PluginError, check_callable

CALL = "load(cfg, seed) returning (train, test, num_classes)"


def _tensors(name: str, split: str, s) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"data.name={name!r}: the {split} set"
    if isinstance(s, (tuple, list)) and len(s) == 2 and all(isinstance(t, torch.Tensor) for t in s):
        x, y = s
    elif isinstance(s, torch.utils.data.Dataset):
        try:
            pairs = [s[i] for i in range(len(s))]
            x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
            y = torch.as_tensor([int(p[1]) for p in pairs])
        except Exception as e:  # noqa: BLE001 - the user's Dataset: say what failed
            raise PluginError(f"{where} is a Dataset whose items are not (x, y) of one shape "
                              f"({type(e).__name__}: {e})") from None
    else:
        raise PluginError(f"{where} is {type(s).__name__}; return a pair of tensors (x, y) or a Dataset of "
                          f"(x, y): {CALL}")
    if len(x) != len(y) or y.ndim != 1 or y.is_floating_point():
        raise PluginError(f"{where}: x has {len(x)} samples, y shape {tuple(y.shape)} ({y.dtype}); y must be "
                          "one integer class per sample")
    return x.float(), y.long()


def plugin_loader(name: str, load):
    check_callable("dataset", name, load, CALL, 2)

    def loader(cfg, seed: int):
        out = load(cfg, seed)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise PluginError(f"data.name={name!r} returned {type(out).__name__}; {CALL}")
        train, test, num_classes = out
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise PluginError(f"data.name={name!r}: num_classes={num_classes!r} must be a positive int")
        (xtr, ytr), (xte, yte) = _tensors(name, "training", train), _tensors(name, "test", test)
        if xtr.shape[1:] != xte.shape[1:]:
            raise PluginError(f"data.name={name!r}: training samples are {tuple(xtr.shape[1:])}, test samples "
                              f"{tuple(xte.shape[1:])}; they must have one shape")
        return xtr, ytr, xte, yte, num_classes
    return loader
