"""HDF5 checkpoints: parameters, momentum, the config and the training position.

Layout of a checkpoint file::

    params/<name>      float32 datasets, PyTorch's names and shapes (conv1.weight ... fc8.bias)
    momentum/<name>    the SGD momentum, same names and shapes
    loader_state/      the data loader's position: arrays as datasets, the rest as JSON attrs
    extra/             anything else the caller saves (e.g. the schedule), same encoding
    attrs: config (the TOML text), model, epoch, step, lr, seed, format

A checkpoint is written to a temporary file in the same directory and renamed over the
target (``os.replace``), so a crash never leaves a half-written checkpoint behind.
"""

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from nbalex.config import load_config

FORMAT = 1


def _json_default(value):
    """NumPy scalars and small arrays inside JSON values (e.g. an np.int64 position)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _write_dict(group, values):
    for key, value in (values or {}).items():
        if isinstance(value, np.ndarray):
            group.create_dataset(key, data=value)
        else:
            group.attrs[key] = json.dumps(value, default=_json_default)


def _read_dict(group):
    out = {key: json.loads(value) for key, value in group.attrs.items()}
    out.update({key: group[key][()] for key in group})
    return out


def save(path, net, *, epoch, step, lr, seed, loader_state=None, extra=None):
    """Write ``net``'s parameters and momentum plus the training position to ``path``, atomically.

    ``loader_state`` and ``extra`` are dicts of NumPy arrays and JSON-encodable values.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params, momentum = net.params(), net.momentum()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["config"] = net.config_text
            f.attrs["model"] = net.name
            f.attrs["epoch"] = int(epoch)
            f.attrs["step"] = int(step)
            f.attrs["lr"] = float(lr)
            f.attrs["seed"] = int(seed)
            for group, arrays in (("params", params), ("momentum", momentum)):
                g = f.create_group(group)
                for name, value in arrays.items():
                    g.create_dataset(name, data=value)
            _write_dict(f.create_group("loader_state"), loader_state)
            _write_dict(f.create_group("extra"), extra)
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _open(path):
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as err:
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from None


def load(path):
    """Everything in a checkpoint: {params, momentum, config_text, model, epoch, step, lr,
    seed, loader_state, extra} (params and momentum as {name: ndarray})."""
    with _open(path) as f:
        if "params" not in f or "config" not in f.attrs:
            raise ValueError(f"{path}: not an nbalex checkpoint (no params group or config)")
        config = str(f.attrs["config"])
        order = _param_order(config)
        return {
            "params": _ordered({k: f["params"][k][()] for k in f["params"]}, order),
            "momentum": _ordered({k: f["momentum"][k][()] for k in f["momentum"]}, order)
            if "momentum" in f else {},
            "config_text": config,
            "model": str(f.attrs.get("model", "")),
            "epoch": int(f.attrs["epoch"]),
            "step": int(f.attrs["step"]),
            "lr": float(f.attrs["lr"]),
            "seed": int(f.attrs["seed"]),
            "loader_state": _read_dict(f["loader_state"]) if "loader_state" in f else {},
            "extra": _read_dict(f["extra"]) if "extra" in f else {},
        }


def load_params(path):
    """Just the parameters: {name: ndarray}, in the network's order."""
    with _open(path) as f:
        if "params" not in f:
            raise ValueError(f"{path}: not an nbalex checkpoint (no params group)")
        config = str(f.attrs.get("config", ""))
        arrays = {k: f["params"][k][()] for k in f["params"]}
    return _ordered(arrays, _param_order(config))


def _ordered(arrays, order):
    """``arrays`` with the names in ``order`` first, in that order (HDF5 lists them sorted)."""
    return {name: arrays[name] for name in order if name in arrays} | arrays


def _param_order(config_text):
    """The parameter names of a config, in network order ([] when it cannot be read)."""
    if "\n" not in config_text:
        return []
    try:
        _, _, specs = load_config(config_text)
    except ValueError:
        return []
    return [p.name for s in specs for p in s.params]


def restore(path, net):
    """Load a checkpoint's parameters and momentum into ``net``; returns :func:`load`'s dict."""
    state = load(path)
    net.load_params(state["params"])
    if state["momentum"]:
        net.load_momentum(state["momentum"])
    return state
