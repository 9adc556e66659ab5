"""HDF5 checkpoints: parameters, momentum, the config and the training position.

Layout of a checkpoint file::

    params/<name>      float32 datasets, PyTorch's names and shapes (conv1.weight ... fc8.bias)
    momentum/<name>    the SGD momentum, same names and shapes
    loader_state/      the data loader's position: arrays as datasets, the rest as JSON attrs
    extra/             anything else the caller saves (e.g. the schedule), same encoding
    attrs: config (the TOML text), model, epoch, step, lr, seed, format, digest

A checkpoint is written to a temporary file in the same directory and renamed over the
target (``os.replace``), so a crash never leaves a half-written checkpoint behind; it gets
the mode any other file the process creates would get (0666 less the umask).

What it promises (format 2):

- every dataset carries HDF5's fletcher32 checksum, and ``digest`` (root attribute) is the
  SHA-256 of the canonical JSON of every other attribute in the file (see :func:`_digest`):
  a damaged checkpoint is refused with one line (:class:`DamagedCheckpoint`); a format-1
  checkpoint (no checksums) is read with a warning;
- parameters and momentum are finite: :func:`save` refuses to write NaN or infinity
  (:class:`NonFiniteParameters`) and the readers refuse a file that holds any.
"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from nbalex.config import load_config

FORMAT = 2
CHECKED_FORMAT = 2      # the first format with checksums and an attribute digest


class DamagedCheckpoint(ValueError):
    """A checkpoint whose checksums or attribute digest do not match its contents."""


class NonFiniteParameters(ValueError):
    """Parameters or momentum holding NaN or infinity (a diverged run): never saved, never used."""


def _stderr(message):
    print(message, file=sys.stderr)


def _json_default(value):
    """NumPy scalars and small arrays inside JSON values (e.g. an np.int64 position)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _create_dataset(group, name, value):
    """A dataset with a fletcher32 checksum (which needs chunks; h5py chooses them)."""
    group.create_dataset(name, data=value, fletcher32=True, chunks=True)


def _write_dict(group, values):
    for key, value in (values or {}).items():
        if isinstance(value, np.ndarray) and value.ndim and value.size:
            _create_dataset(group, key, value)
        else:
            group.attrs[key] = json.dumps(value, default=_json_default)


def _read_dict(group, path):
    out = {key: json.loads(value) for key, value in group.attrs.items()}
    out.update({key: _read(group, key, path) for key in group})
    return out


def save(path, net, *, epoch, step, lr, seed, loader_state=None, extra=None):
    """Write ``net``'s parameters and momentum plus the training position to ``path``, atomically.

    ``loader_state`` and ``extra`` are dicts of NumPy arrays and JSON-encodable values.
    Raises :class:`NonFiniteParameters` (writing nothing) when a parameter or momentum value
    is NaN or infinite.
    """
    path = Path(path)
    params, momentum = net.params(), net.momentum()
    _check_finite(params, momentum, f"refusing to write {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
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
                    _create_dataset(g, name, np.asarray(value))
            _write_dict(f.create_group("loader_state"), loader_state)
            _write_dict(f.create_group("extra"), extra)
            f.attrs["digest"] = _digest(f)
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask():
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_finite(params, momentum, what):
    for group, arrays in (("params", params), ("momentum", momentum)):
        for name, value in arrays.items():
            if not np.isfinite(value).all():
                raise NonFiniteParameters(
                    f"{what}: {group}/{name} holds NaN or infinite values (the run diverged)")


def _attr_value(value):
    """An attribute as plain JSON data (h5py hands back NumPy scalars and bytes)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (np.generic, np.ndarray)):
        return _attr_value(value.tolist()) if not isinstance(value, np.bytes_) else value.decode()
    if isinstance(value, list):
        return [_attr_value(v) for v in value]
    return value


def _digest(f):
    """SHA-256 of every attribute in the file but ``digest`` itself, as canonical JSON:
    {"<group path>": {name: value}} with sorted keys (the run state lives in attributes)."""
    attrs = {"/": {k: _attr_value(v) for k, v in f.attrs.items() if k != "digest"}}
    f.visititems(lambda name, obj: attrs.__setitem__(
        name, {k: _attr_value(v) for k, v in obj.attrs.items()}) if obj.attrs else None)
    text = json.dumps(attrs, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _open(path):
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as err:
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from None


def _verify_attrs(f, path, warn):
    """Check the attribute digest (format 2), or warn that an older file cannot be checked."""
    if int(f.attrs.get("format", 1)) < CHECKED_FORMAT:
        warn(f"warning: {path} is an older checkpoint without checksums; it cannot be "
             f"checked for damage")
        return
    if str(_attr_value(f.attrs.get("digest", ""))) != _digest(f):
        raise DamagedCheckpoint(f"{path} is damaged: its run state (attributes) does not match "
                                f"its digest; use another copy or start a new run")


def _read(f, name, path):
    """A dataset's contents; a failed checksum or read is a one-line DamagedCheckpoint."""
    full = f"{f.name.rstrip('/')}/{name}".lstrip("/")
    try:
        return f[name][()]
    except (OSError, KeyError, RuntimeError) as err:
        detail = " ".join(str(err).split())
        checked = isinstance(f.get(name), h5py.Dataset) and f[name].fletcher32
        reason = "fails its checksum" if checked else f"cannot be read ({detail})"
        raise DamagedCheckpoint(f"{path} is damaged: {full} {reason}; use another copy or "
                                f"start a new run") from None


def _arrays(f, group, path):
    return {k: _read(f, f"{group}/{k}", path) for k in f[group]} if group in f else {}


def load(path, warn=_stderr):
    """Everything in a checkpoint: {params, momentum, config_text, model, epoch, step, lr,
    seed, loader_state, extra} (params and momentum as {name: ndarray}).

    Raises :class:`DamagedCheckpoint` when a checksum or the digest fails and
    :class:`NonFiniteParameters` when a parameter is NaN or infinite; an older checkpoint
    without checksums is read after ``warn(line)``.
    """
    with _open(path) as f:
        if "params" not in f or "config" not in f.attrs:
            raise ValueError(f"{path}: not an nbalex checkpoint (no params group or config)")
        _verify_attrs(f, path, warn)
        config = str(f.attrs["config"])
        order = _param_order(config)
        params = _ordered(_arrays(f, "params", path), order)
        momentum = _ordered(_arrays(f, "momentum", path), order)
        _check_finite(params, momentum, f"{path} cannot be used")
        return {
            "params": params,
            "momentum": momentum,
            "config_text": config,
            "model": str(f.attrs.get("model", "")),
            "epoch": int(f.attrs["epoch"]),
            "step": int(f.attrs["step"]),
            "lr": float(f.attrs["lr"]),
            "seed": int(f.attrs["seed"]),
            "loader_state": _read_dict(f["loader_state"], path) if "loader_state" in f else {},
            "extra": _read_dict(f["extra"], path) if "extra" in f else {},
        }


def load_params(path, warn=_stderr):
    """Just the parameters: {name: ndarray}, in the network's order (checked as :func:`load`)."""
    with _open(path) as f:
        if "params" not in f:
            raise ValueError(f"{path}: not an nbalex checkpoint (no params group)")
        _verify_attrs(f, path, warn)
        config = str(f.attrs.get("config", ""))
        arrays = _arrays(f, "params", path)
    _check_finite(arrays, {}, f"{path} cannot be used")
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
