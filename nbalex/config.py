"""Network configs: TOML files that describe a network as data, checked and shape-inferred.

A config names the network, the packed image size and the training crop, and lists the
layers in order (``[[layers]]`` tables).  Each layer has a ``name``, a ``type`` and that
type's fields (see :data:`LAYER_FIELDS`; ``None`` marks a required field)::

    name = "alexnet"
    image_size = 256          # side of the packed (stored) images
    input_size = 227          # side of the crop the network sees
    init_std = 0.01           # default std of the N(0, std) weight init

    [[layers]]
    name = "conv1"
    type = "conv"
    filters = 96
    kernel = 11
    stride = 4
    relu = true

The last layer must be ``fc``: its outputs are the logits and the loss is softmax
cross-entropy.  Its ``outputs`` may be the string ``"classes"``: the layer then *follows the
data*.  :func:`sized_to` rewrites such a config for a dataset's class count (training does,
so the checkpoint's config text states the count); until then the top-level ``classes``
field is the count used.  A mistake (including a NaN or infinite number) raises
:class:`ConfigError` with a one-line message naming the layer and the field.
"""

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"

_PARAM_FIELDS = {
    "init_std": "default",   # std of the N(0, std) weights; "default" = the top-level init_std
    "bias_init": 0.0,        # constant the biases start at
    "lr_mult": 1.0,          # learning-rate multiplier of the weights
    "bias_lr_mult": 1.0,     # ... of the biases
    "decay_mult": 1.0,       # weight-decay multiplier of the weights
    "bias_decay_mult": 0.0,  # ... of the biases (the paper's rule decays weights only)
}

LAYER_FIELDS = {
    "conv": {"filters": None, "kernel": None, "stride": 1, "pad": 0, "groups": 1,
             "relu": False, **_PARAM_FIELDS},
    "fc": {"outputs": None, "relu": False, **_PARAM_FIELDS},   # outputs: int or "classes"
    "lrn": {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0, "groups": 1},
    "maxpool": {"size": 3, "stride": 2},
    "dropout": {"p": 0.5},
}
"""Every layer type's fields and defaults (None = required)."""

TOP_FIELDS = {"name": None, "image_size": None, "input_size": None, "input_channels": 3,
              "init_std": 0.01, "classes": "unset", "layers": None}
"""Top-level fields (None = required; ``classes`` is needed only where the last layer follows
the data and no dataset has sized it)."""

FOLLOWS_DATA = "classes"
"""The value of the last layer's ``outputs`` that sizes it to the data's class count."""


class ConfigError(ValueError):
    """A config that cannot describe a network; the message names the layer and the field."""


@dataclass
class ParamSpec:
    """One parameter tensor: its PyTorch-style name, shape, initialisation and multipliers."""
    name: str
    shape: tuple
    init_std: float     # > 0: N(0, init_std); 0: the constant ``init_value``
    init_value: float
    lr_mult: float
    decay_mult: float

    @property
    def size(self):
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class LayerSpec:
    """One layer after checking: its fields, per-example in/out shapes, parameters and MACs."""
    name: str
    type: str
    fields: dict
    in_shape: tuple
    out_shape: tuple
    params: list = field(default_factory=list)
    macs: int = 0

    def __getitem__(self, key):
        return self.fields[key]


def resolve_source(source):
    """(text, origin) for a config name (``alexnet``), a path to a TOML file, or TOML text."""
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise ConfigError(f"a config is a model name, a .toml path or TOML text, not {type(source).__name__}")
    if "\n" in source:
        return source, "<config text>"
    path = Path(source)
    if path.suffix != ".toml" and not path.exists():
        path = CONFIG_DIR / f"{source}.toml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
            raise ConfigError(f"unknown model {source!r}: give a path to a .toml file or one of {known}")
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return path.read_text(), str(path)


def load_config(source):
    """(config dict, TOML text, [LayerSpec]) for a config name, a file path or TOML text."""
    text, origin = resolve_source(source)
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML: {err}") from None
    return config, text, check_config(config, origin)


def _number(where, key, value, *, integer=False, minimum=None, positive=False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: field {key!r} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where}: field {key!r} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: field {key!r} must be >= {minimum}, got {value!r}")
    return value


def _fields(where, table, defaults):
    unknown = sorted(set(table) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(defaults))})")
    out = dict(defaults)
    for key, default in defaults.items():
        if key in table:
            out[key] = table[key]
        elif default is None:
            raise ConfigError(f"{where}: missing required field {key!r}")
    return out


def check_config(config, origin="<config>"):
    """Check a parsed config and infer every layer's shapes; returns [LayerSpec]."""
    top = {k: v for k, v in config.items()}
    top.setdefault("name", Path(origin).stem if origin.endswith(".toml") else None)
    top = _fields(origin, top, TOP_FIELDS)
    if not isinstance(top["name"], str) or not top["name"]:
        raise ConfigError(f"{origin}: field 'name' must be a non-empty string")
    for key in ("image_size", "input_size", "input_channels"):
        _number(origin, key, top[key], integer=True, positive=True)
    if top["input_size"] > top["image_size"]:
        raise ConfigError(f"{origin}: input_size {top['input_size']} is larger than image_size {top['image_size']}")
    _number(origin, "init_std", top["init_std"], minimum=0)
    if top["classes"] == "unset":
        top["classes"] = None
    else:
        _number(origin, "classes", top["classes"], integer=True, positive=True)
    layers = top["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(t, dict) for t in layers):
        raise ConfigError(f"{origin}: 'layers' must be a non-empty array of tables ([[layers]])")

    shape = (top["input_channels"], top["input_size"], top["input_size"])
    specs, names = [], set()
    for i, table in enumerate(layers):
        name = table.get("name", f"#{i}")
        where = f"{origin}: layer {name!r}"
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{origin}: layer {i}: field 'name' must be an identifier, got {name!r}")
        if name in names:
            raise ConfigError(f"{where}: field 'name' repeats an earlier layer's name")
        names.add(name)
        kind = table.get("type")
        if kind not in LAYER_FIELDS:
            raise ConfigError(f"{where}: field 'type' must be one of {', '.join(LAYER_FIELDS)}, got {kind!r}")
        fields = _fields(where, {k: v for k, v in table.items() if k not in ("name", "type")},
                         LAYER_FIELDS[kind])
        spec = _LAYER_CHECKS[kind](where, name, fields, shape, top)
        specs.append(spec)
        shape = spec.out_shape
    for spec, table in zip(specs[:-1], layers):
        if table.get("outputs") == FOLLOWS_DATA:
            raise ConfigError(f"{origin}: layer {spec.name!r}: field 'outputs' can be "
                              f"{FOLLOWS_DATA!r} only on the last layer (the logits)")
    if specs[-1].type != "fc":
        raise ConfigError(f"{origin}: layer {specs[-1].name!r}: field 'type' of the last layer must be "
                          "'fc' (its outputs are the logits)")
    if specs[-1]["relu"]:
        raise ConfigError(f"{origin}: layer {specs[-1].name!r}: field 'relu' must be false on the logits layer")
    return specs


def _params(where, name, fields, top, weight_shape, bias_size):
    for key in ("bias_init", "lr_mult", "bias_lr_mult", "decay_mult", "bias_decay_mult"):
        _number(where, key, fields[key], minimum=0 if "mult" in key else None)
    std = top["init_std"] if fields["init_std"] == "default" else fields["init_std"]
    _number(where, "init_std", std, minimum=0)
    return [ParamSpec(f"{name}.weight", weight_shape, float(std), 0.0,
                      float(fields["lr_mult"]), float(fields["decay_mult"])),
            ParamSpec(f"{name}.bias", (bias_size,), 0.0, float(fields["bias_init"]),
                      float(fields["bias_lr_mult"]), float(fields["bias_decay_mult"]))]


def _check_conv(where, name, f, shape, top):
    for key in ("filters", "kernel", "stride", "groups"):
        _number(where, key, f[key], integer=True, positive=True)
    _number(where, "pad", f["pad"], integer=True, minimum=0)
    if not isinstance(f["relu"], bool):
        raise ConfigError(f"{where}: field 'relu' must be true or false")
    if len(shape) != 3:
        raise ConfigError(f"{where}: field 'type' conv needs an image-shaped input, got shape {shape}")
    c, h, w = shape
    if c % f["groups"] or f["filters"] % f["groups"]:
        raise ConfigError(f"{where}: field 'groups' ({f['groups']}) must divide the input channels "
                          f"({c}) and the filters ({f['filters']})")
    out = (h + 2 * f["pad"] - f["kernel"]) // f["stride"] + 1
    if out < 1 or (w + 2 * f["pad"] - f["kernel"]) // f["stride"] + 1 < 1:
        raise ConfigError(f"{where}: field 'kernel' ({f['kernel']}) is larger than the padded input {h}x{w}")
    wshape = (f["filters"], c // f["groups"], f["kernel"], f["kernel"])
    out_shape = (f["filters"], out, (w + 2 * f["pad"] - f["kernel"]) // f["stride"] + 1)
    macs = out_shape[0] * out_shape[1] * out_shape[2] * wshape[1] * wshape[2] * wshape[3]
    return LayerSpec(name, "conv", f, shape, out_shape,
                     _params(where, name, f, top, wshape, f["filters"]), macs)


def _check_fc(where, name, f, shape, top):
    if f["outputs"] == FOLLOWS_DATA:
        if top["classes"] is None:
            raise ConfigError(f"{where}: field 'outputs' follows the data ({FOLLOWS_DATA!r}) but "
                              f"no class count is known: set the top-level field 'classes' or "
                              f"size it to a dataset")
        f = {**f, "outputs": top["classes"]}
    _number(where, "outputs", f["outputs"], integer=True, positive=True)
    if not isinstance(f["relu"], bool):
        raise ConfigError(f"{where}: field 'relu' must be true or false")
    inputs = 1
    for s in shape:
        inputs *= s
    return LayerSpec(name, "fc", f, shape, (f["outputs"],),
                     _params(where, name, f, top, (f["outputs"], inputs), f["outputs"]),
                     f["outputs"] * inputs)


def _check_lrn(where, name, f, shape, top):
    _number(where, "size", f["size"], integer=True, positive=True)
    if f["size"] % 2 == 0:
        raise ConfigError(f"{where}: field 'size' must be odd (a window centred on each channel), got {f['size']}")
    for key in ("alpha", "beta", "k"):
        _number(where, key, f[key], minimum=0)
    _number(where, "groups", f["groups"], integer=True, positive=True)
    if shape[0] % f["groups"]:
        raise ConfigError(f"{where}: field 'groups' ({f['groups']}) must divide the channels ({shape[0]})")
    return LayerSpec(name, "lrn", f, shape, shape)


def _check_maxpool(where, name, f, shape, top):
    for key in ("size", "stride"):
        _number(where, key, f[key], integer=True, positive=True)
    if len(shape) != 3:
        raise ConfigError(f"{where}: field 'type' maxpool needs an image-shaped input, got shape {shape}")
    c, h, w = shape
    if f["size"] > min(h, w):
        raise ConfigError(f"{where}: field 'size' ({f['size']}) is larger than the input {h}x{w}")
    out = ((h - f["size"]) // f["stride"] + 1, (w - f["size"]) // f["stride"] + 1)
    return LayerSpec(name, "maxpool", f, shape, (c, *out))


def _check_dropout(where, name, f, shape, top):
    _number(where, "p", f["p"], minimum=0)
    if f["p"] >= 1:
        raise ConfigError(f"{where}: field 'p' must be below 1, got {f['p']}")
    return LayerSpec(name, "dropout", f, shape, shape)


_LAYER_CHECKS = {"conv": _check_conv, "fc": _check_fc, "lrn": _check_lrn,
                 "maxpool": _check_maxpool, "dropout": _check_dropout}


# ------------------------------------------------------------------ sizing to the data
def follows_data(source):
    """Whether the last layer of a config (name, path or text) takes the data's class count."""
    text, origin = resolve_source(source)
    return _last_outputs(text, origin) == FOLLOWS_DATA


def _last_outputs(text, origin):
    try:
        layers = tomllib.loads(text).get("layers")
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML: {err}") from None
    if not isinstance(layers, list) or not layers or not isinstance(layers[-1], dict):
        return None
    return layers[-1].get("outputs")


def sized_to(source, classes):
    """The TOML text of a config (name, path or text) sized for ``classes`` classes.

    A config whose last layer says ``outputs = "classes"`` gets its top-level ``classes``
    field set (added or replaced; comments are kept); one with a fixed output count is
    returned as it is (checking it against the data is the caller's job).  A config file
    without a ``name`` gets its file name, so the text stands alone (e.g. in a checkpoint).
    Raises :class:`ConfigError` when the result is not a valid config.
    """
    text, origin = resolve_source(source)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    top_end = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    parsed_top = _top_keys(text, origin)
    if "name" not in parsed_top and origin.endswith(".toml"):
        lines.insert(0, f"name = {_toml_string(Path(origin).stem)}\n")
        top_end += 1
    if _last_outputs(text, origin) == FOLLOWS_DATA:
        classes = _number(origin, "classes", classes, integer=True, positive=True)
        line = f"classes = {classes}   # sized to the training data\n"
        found = [i for i in range(top_end) if re.match(r"\s*classes\s*=", lines[i])]
        if found:
            lines[found[0]] = line
        else:
            lines.insert(top_end, line)
    sized = "".join(lines)
    config, _, specs = load_config(sized)
    if _last_outputs(text, origin) == FOLLOWS_DATA and config.get("classes") != classes:
        raise ConfigError(f"{origin}: could not set the top-level field 'classes' (write it "
                          f"as one 'classes = N' line before the first table)")
    return sized


def _top_keys(text, origin):
    try:
        return set(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML: {err}") from None


def _toml_string(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
