"""Published ImageNet weights (Keras .h5, torchvision .pth / .safetensors) as cnnjax variables.

Nothing here downloads. Get the files once, with a browser or ``curl -LO``:

* Keras applications (the lecture's ``VGG16(weights="imagenet")``), from the
  keras-applications release files on Google Cloud Storage::

    https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5
    https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5
    https://storage.googleapis.com/tensorflow/keras-applications/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5
    https://storage.googleapis.com/tensorflow/keras-applications/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5

  (Keras caches them in ``~/.keras/models/`` once it has fetched them.)
* torchvision's model zoo (``IMAGENET1K_V1`` weights)::

    https://download.pytorch.org/models/vgg16-397923af.pth
    https://download.pytorch.org/models/vgg19-dcbb9e9d.pth
    https://download.pytorch.org/models/alexnet-owt-7be5be79.pth

  (torch caches them in ``~/.cache/torch/hub/checkpoints/``.) A ``.pth`` is
  read with ``torch.load(..., weights_only=True)`` and needs PyTorch; convert it
  once to ``.safetensors`` (``safetensors.torch.save_file(state_dict, path)``)
  to load it without torch.

Entry points, each returning ``{"params": ...}`` for ``cnnjax.models.get(model_name,
**model_kwargs)``::

    variables = cnnjax.weights.load("vgg16_weights_tf_dim_ordering_tf_kernels.h5", "vgg16")
    variables = cnnjax.weights.load("..._notop.h5", "vgg16", include_top=False)
    variables = cnnjax.weights.load("alexnet-owt-7be5be79.pth", "alexnet_torchvision")
    model, variables = cnnjax.models.pretrained("vgg16", "vgg16-397923af.pth")
    x = cnnjax.weights.preprocess_keras_caffe(rgb_uint8_images)   # what the .h5 expects

Conversions. Keras files already hold HWIO conv kernels and (in, out) dense
kernels, and Keras flattens H, W, C like cnnjax: arrays map by layer name.
torchvision's conv weights are OIHW (-> HWIO, ``transpose(2, 3, 1, 0)``), its
linear weights (out, in) (-> transposed), and it flattens the last feature map
in C, H, W order: the first FC layer's input rows are permuted to cnnjax's
H, W, C order, so the logits are the same. Conv and linear layers map by order
(``features.*`` onto the model's convolutions, ``classifier.*`` onto its
dense layers).

torchvision's VGG is cnnjax's ``vgg16`` / ``vgg19``: at 224x224 its adaptive
7x7 average pool is the identity, so the parameters and the eval-mode logits
are the same; pass ``dropout_rate=0.5`` to train with torchvision's dropout
after fc1 and fc2. torchvision's AlexNet is ``alexnet_torchvision`` (see
:mod:`cnnjax.models.torchvision_alexnet`), not the paper's ``alexnet``.

Every loader checks every name and shape and raises one :class:`WeightsError`
listing all the problems, and, when the file fits another registered model,
names it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "WeightsError",
    "WeightSet",
    "WEIGHT_SETS",
    "KERAS_CAFFE_MEAN_BGR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "preprocess_keras_caffe",
    "preprocess_torchvision",
    "weight_set",
    "file_format",
    "input_normalization",
    "load_keras_h5",
    "load_torchvision",
    "load",
    "load_into",
    "pretrained",
]


class WeightsError(ValueError):
    """A weights file that cannot be read, or does not fit the model."""


# --------------------------------------------------------------------------- preprocessing

KERAS_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_keras_caffe(images) -> jax.Array:
    """Keras' ``"caffe"`` mode (``keras.applications.vgg16.preprocess_input``).

    ``images``: RGB, values 0..255, channels last (uint8 or float). Returns
    float32 BGR with the ImageNet BGR mean (103.939, 116.779, 123.68) subtracted
    and no scaling: what the Keras VGG ``.h5`` weights expect.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    return x[..., ::-1] - jnp.asarray(KERAS_CAFFE_MEAN_BGR, jnp.float32)


def preprocess_torchvision(images) -> jax.Array:
    """torchvision's ImageNet normalization: x / 255, then (x - mean) / std per RGB channel.

    ``images``: RGB, values 0..255, channels last. mean (0.485, 0.456, 0.406),
    std (0.229, 0.224, 0.225). (torchvision also resizes to 256 and center-crops
    224; that is the caller's business.)
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


_PREPROCESS = {"keras": preprocess_keras_caffe, "torchvision": preprocess_torchvision}


# --------------------------------------------------------------------------- metadata

@dataclasses.dataclass(frozen=True)
class WeightSet:
    """One published weights file and what it expects.

    ``top1`` / ``top5`` are the publisher's ImageNet validation accuracies (%),
    single 224 center crop (None where not published); ``params`` counts the
    file's parameters.
    """

    file_name: str
    model: str
    model_kwargs: tuple[tuple[str, Any], ...]
    source: str                     # "keras" | "torchvision"
    url: str
    params: int
    input_size: tuple[int, int, int]
    preprocessing: str              # name of the function in this module
    top1: float | None = None
    top5: float | None = None

    @property
    def preprocess(self):
        return _PREPROCESS[self.source]


_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
_TORCH_URL = "https://download.pytorch.org/models/"


def _keras(depth: int, top: bool, params: int) -> WeightSet:
    name = f"vgg{depth}_weights_tf_dim_ordering_tf_kernels{'' if top else '_notop'}.h5"
    # keras.io/api/applications: VGG16 71.3 / 90.1, VGG19 71.3 / 90.0 (models with their top).
    acc = {16: (71.3, 90.1), 19: (71.3, 90.0)}[depth] if top else (None, None)
    return WeightSet(name, f"vgg{depth}", () if top else (("include_top", False),), "keras",
                     f"{_KERAS_URL}vgg{depth}/{name}", params, (224, 224, 3),
                     "preprocess_keras_caffe", *acc)


WEIGHT_SETS: dict[str, WeightSet] = {w.file_name: w for w in [
    _keras(16, True, 138_357_544),
    _keras(16, False, 14_714_688),
    _keras(19, True, 143_667_240),
    _keras(19, False, 20_024_384),
    # torchvision's IMAGENET1K_V1 weights: acc@1 / acc@5 from their model metadata.
    WeightSet("vgg16-397923af.pth", "vgg16", (), "torchvision", f"{_TORCH_URL}vgg16-397923af.pth",
              138_357_544, (224, 224, 3), "preprocess_torchvision", 71.592, 90.382),
    WeightSet("vgg19-dcbb9e9d.pth", "vgg19", (), "torchvision", f"{_TORCH_URL}vgg19-dcbb9e9d.pth",
              143_667_240, (224, 224, 3), "preprocess_torchvision", 72.376, 90.876),
    WeightSet("alexnet-owt-7be5be79.pth", "alexnet_torchvision", (), "torchvision",
              f"{_TORCH_URL}alexnet-owt-7be5be79.pth", 61_100_840, (224, 224, 3),
              "preprocess_torchvision", 56.522, 79.066),
]}


def weight_set(path: str | os.PathLike) -> WeightSet | None:
    """The metadata of a published file, recognized by its name (a .safetensors
    conversion of a torchvision file keeps the stem); None for any other file."""
    name = os.path.basename(os.fspath(path))
    if name in WEIGHT_SETS:
        return WEIGHT_SETS[name]
    stem = os.path.splitext(name)[0]
    return WEIGHT_SETS.get(stem + ".pth")


# --------------------------------------------------------------------------- file types

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def file_format(path: str | os.PathLike) -> str:
    """``"keras"`` (HDF5) or ``"torchvision"`` (.safetensors / .pth), by content, then name."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist; pass the path of a "
                           "downloaded .h5, .pth or .safetensors file.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_HDF5_MAGIC):
        return "keras"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torchvision"  # a torch.save zip archive, or a legacy pickle
    if len(head) > 8 and head[8:9] == b"{":
        return "torchvision"  # safetensors: 8-byte header length, then a JSON header
    ext = os.path.splitext(path)[1].lower()
    if ext in (".h5", ".hdf5"):
        return "keras"
    if ext in (".pth", ".pt", ".safetensors", ".bin"):
        return "torchvision"
    raise WeightsError(f"{path!r} is neither HDF5 (.h5) nor a torch/safetensors file; pass a "
                       "Keras .h5, a torchvision .pth or a .safetensors file.")


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return path.lower().endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{")


# --------------------------------------------------------------------------- models

def _build(model_name, model_kwargs) -> tuple[Any, str]:
    """The model and a label for messages, e.g. ``vgg16(include_top=False)``."""
    from cnnjax import models

    if isinstance(model_name, str):
        model = models.get(model_name, **model_kwargs)
        args = ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
        return model, f"{model_name}({args})" if args else model_name
    if model_kwargs:
        raise ValueError("model_kwargs are only used with a model name; pass either "
                         "a model instance or a name plus keyword arguments.")
    return model_name, type(model_name).__name__


def _expected_params(model) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{layer: {"kernel": shape, "bias": shape}}`` of a model, traced without memory."""
    shape = tuple(model.input_shape)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    return jax.tree.map(lambda s: tuple(s.shape), dict(variables["params"]))


def _param_layers(model, expected) -> list[str]:
    """The layers holding parameters, in call order."""
    order = model.layer_names() if hasattr(model, "layer_names") else list(expected)
    return [name for name in order if name in expected]


def _flatten_input(model) -> tuple[int, int, int] | None:
    """The (H, W, C) map flattened before the first dense layer, if the model has one."""
    from cnnjax import layers as L

    if not hasattr(model, "layers"):
        return None
    shape = tuple(model.input_shape)
    for spec in model.layers():
        if spec.cls is L.Flatten:
            return shape if len(shape) == 3 else None
        shape = spec.unbound().output_shape(shape)
    return None


@functools.cache
def _signature(name: str, include_top: bool) -> tuple | None:
    """The parameter shapes of a registered model in call order (None if it has none)."""
    from cnnjax import models

    try:
        model = models.get(name, include_top=include_top)
        expected = _expected_params(model)
    except Exception:  # not a plain classifier (e.g. a transfer model): not a candidate
        return None
    return tuple(tuple(expected[n][k] for k in sorted(expected[n]))
                 for n in _param_layers(model, expected))


def _fits(file_shapes: list[tuple]) -> list[str]:
    """Registered models whose parameter shapes equal the file's (the class count may differ)."""
    from cnnjax import models

    file_sig = tuple(file_shapes)
    found = []
    for name in models.available():
        for top in (True, False):
            sig = _signature(name, top)
            if not sig or len(sig) != len(file_sig):
                continue
            if sig == file_sig:
                found.append(name if top else f"{name}(include_top=False)")
            elif top and sig[:-1] == file_sig[:-1] and len(sig[-1]) == len(file_sig[-1]) and \
                    all(a[:-1] == b[:-1] for a, b in zip(sig[-1], file_sig[-1], strict=True)):
                found.append(f"{name}(num_classes={file_sig[-1][0][-1]})")
    return found


def _fail(path: str, label: str, problems: list[str], file_shapes: list[tuple] | None,
          hint: str = "") -> None:
    lines = [f"{os.fspath(path)} does not fit {label}: {len(problems)} problem(s):"]
    lines += [f"  - {p}" for p in problems]
    if file_shapes:
        fits = _fits(file_shapes)
        if fits:
            lines.append(f"The file fits {' and '.join(fits)}; load it for that model.")
        else:
            lines.append("The file fits no registered model.")
    if hint:
        lines.append(hint)
    raise WeightsError("\n".join(lines))


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_and_build(path, label, expected, layers, assigned, problems, file_shapes,
                     hint="", source_names=None) -> dict:
    """Checks ``assigned`` ({layer: {param: array}}) against ``expected``; all problems at once.

    ``source_names`` maps a layer to its name in the file where that differs
    (torchvision's ``features.0``), for the messages.
    """
    source_names = source_names or {}
    for name in layers:
        where = f"{source_names[name]} -> {name}" if name in source_names else name
        for param in _kernel_first(expected[name]):
            shape = expected[name][param]
            got = assigned.get(name, {}).get(param)
            if got is None:
                if name in assigned:
                    problems.append(f"{where}/{param}: missing from the file "
                                    f"(expected shape {_shape_text(shape)})")
                continue
            if tuple(got.shape) != tuple(shape):
                note = " after conversion" if name in source_names else ""
                problems.append(f"{where}/{param}: file has shape {_shape_text(got.shape)}"
                                f"{note}, {label} expects {_shape_text(shape)}")
    missing = [n for n in layers if n not in assigned]
    if missing:
        problems.append("layer(s) missing from the file: " + ", ".join(
            f"{n} ({', '.join(f'{k} {_shape_text(expected[n][k])}' for k in _kernel_first(expected[n]))})"  # noqa: E501
            for n in missing))
    if problems:
        _fail(path, label, problems, file_shapes, hint)
    return {"params": {name: {param: jnp.asarray(assigned[name][param], jnp.float32)
                              for param in expected[name]} for name in layers}}


def _kernel_first(params) -> list[str]:
    return sorted(params, key=lambda k: (k != "kernel", k))


def _first_conv(layers, expected) -> str | None:
    return next((n for n in layers if len(expected[n].get("kernel", ())) == 4), None)


# --------------------------------------------------------------------------- Keras

def _decode(values) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in np.atleast_1d(values)]


def _read_keras_h5(path: str) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """``[(layer, [(weight name, array), ...]), ...]`` in the file's layer order."""
    try:
        import h5py
    except ImportError:
        raise WeightsError("reading a Keras .h5 file needs h5py; pip install h5py.") from None
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise WeightsError(
                    f"{path} has no 'layer_names' attribute, so it is not a Keras legacy HDF5 "
                    "weights file (Keras 3 '.weights.h5' files are not supported); use the "
                    "keras-applications vgg16/vgg19 *_tf_kernels*.h5 files.")
            result = []
            for layer in _decode(root.attrs["layer_names"]):
                group = root[layer]
                names = _decode(group.attrs.get("weight_names", []))
                result.append((layer, [(n, np.asarray(group[n][()], np.float32)) for n in names]))
            return result
    except WeightsError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise WeightsError(f"cannot read {path} as a Keras HDF5 weights file ({err}); the file "
                           "is truncated or corrupt: download it again.") from None


def _keras_param(weight_name: str, index: int) -> str:
    tail = weight_name.rsplit("/", 1)[-1]
    if tail.startswith("kernel") or re.search(r"_W(_\d+)?:\d+$", tail):
        return "kernel"
    if tail.startswith("bias") or re.search(r"_b(_\d+)?:\d+$", tail):
        return "bias"
    return ("kernel", "bias")[index] if index < 2 else tail


def load_keras_h5(path: str | os.PathLike, model_name="vgg16", *, bgr_to_rgb: bool = False,
                  **model_kwargs) -> dict:
    """Variables for ``cnnjax.models.get(model_name, **model_kwargs)`` from a Keras .h5 file.

    The legacy HDF5 layout of the keras-applications files: the root (or its
    ``model_weights`` group) lists ``layer_names``; each layer's group lists
    ``weight_names`` such as ``block1_conv1_W_1:0`` or ``block1_conv1/kernel:0``.
    Arrays map by layer name (kernel first, bias second), unchanged: Keras'
    layouts are cnnjax's. A ``_notop`` file needs ``include_top=False``.

    ``bgr_to_rgb=True`` reverses the first convolution's input channels so the
    model takes RGB (normalize with :func:`input_normalization`); by default the
    model expects :func:`preprocess_keras_caffe` (BGR) input as Keras does.

    Raises:
      WeightsError: the file is unreadable, or any layer name or shape differs
        (all problems in one message, with the registered model the file fits).
    """
    path = os.fspath(path)
    model, label = _build(model_name, model_kwargs)
    file_layers = [(layer, w) for layer, w in _read_keras_h5(path) if w]
    expected = _expected_params(model)
    layers = _param_layers(model, expected)
    problems, assigned, file_shapes = [], {}, []
    for layer, weights in file_layers:
        params = {}
        for i, (wname, array) in enumerate(weights):
            params[_keras_param(wname, i)] = array
        file_shapes.append(tuple(tuple(params[k].shape) for k in sorted(params)))
        if layer not in expected:
            problems.append(f"layer {layer} in the file is not in {label}")
            continue
        extra = sorted(set(params) - set(expected[layer]))
        if extra:
            problems.append(f"{layer}: unexpected weights {extra} in the file")
        kernel, want = params.get("kernel"), expected[layer].get("kernel")
        if kernel is not None and want is not None and kernel.ndim == 4 and \
                tuple(kernel.shape) == (want[3], want[2], want[0], want[1]):
            problems.append(f"{layer}/kernel is channels-first {_shape_text(kernel.shape)} "
                            "(a Theano-ordered file); use the *_tf_dim_ordering_tf_kernels.h5 file")
            continue
        assigned[layer] = params
    result = _check_and_build(path, label, expected, layers, assigned, problems, file_shapes,
                              _top_hint(model, layers, assigned))
    if bgr_to_rgb:
        first = _first_conv(layers, expected)
        if first is not None:
            result["params"][first]["kernel"] = result["params"][first]["kernel"][:, :, ::-1, :]
    return result


def _top_hint(model, layers, assigned) -> str:
    missing = [n for n in layers if n not in assigned]
    if missing and getattr(model, "include_top", False) and len(missing) < len(layers):
        return ("If this is a notop file (no classifier layers), pass include_top=False.")
    return ""


# --------------------------------------------------------------------------- torchvision

_TV_KEY = re.compile(r"^(features|classifier)\.(\d+)\.(weight|bias)$")


def _read_torchvision(path: str) -> dict[str, np.ndarray]:
    if _is_safetensors(path):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise WeightsError("reading a .safetensors file needs the safetensors package; "
                               "pip install safetensors.") from None
        try:
            tensors = load_file(path)
        except Exception as err:  # SafetensorError, or a truncated header
            raise WeightsError(f"cannot read {path} as a safetensors file ({err}); the file is "
                               "truncated or corrupt: download or convert it again.") from None
        return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path} is a PyTorch pickle (.pth) and reading it needs torch, which is not "
            "installed; pip install torch, or convert it once to .safetensors where torch is "
            "installed (safetensors.torch.save_file(torch.load(path), 'model.safetensors')).") \
            from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True) ({err}); "
                           "the file is truncated, corrupt or not a state dict: download it "
                           "again.") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(
            state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict; save "
                           "model.state_dict() instead of the model.")
    out = {}
    for key, value in state.items():
        if hasattr(value, "detach"):
            out[key] = value.detach().to(torch.float32).cpu().numpy()
    return out


def _torch_layers(state: Mapping[str, np.ndarray]):
    """(features layers, classifier layers, unexpected keys) in index order."""
    groups: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    unexpected = []
    for key, array in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        m = _TV_KEY.match(key)
        if m is None:
            unexpected.append(key)
            continue
        groups.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = array
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != "features", kv[0][1]))
    features = [(f"features.{i}", g) for (sec, i), g in ordered if sec == "features"]
    classifier = [(f"classifier.{i}", g) for (sec, i), g in ordered if sec == "classifier"]
    return features, classifier, unexpected


def _torch_to_cnnjax(name, group, flatten_chw=None) -> dict[str, np.ndarray]:
    """OIHW -> HWIO; (out, in) -> (in, out), with (C, H, W) inputs reordered to (H, W, C)."""
    out = {}
    w = group.get("weight")
    if w is not None:
        if w.ndim == 4:
            out["kernel"] = np.transpose(w, (2, 3, 1, 0))
        elif w.ndim == 2:
            if flatten_chw is not None:
                h, wd, c = flatten_chw
                w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
            out["kernel"] = w.T
        else:
            out["kernel"] = w
    if "bias" in group:
        out["bias"] = group["bias"]
    return out


def load_torchvision(path: str | os.PathLike, model_name="vgg16", **model_kwargs) -> dict:
    """Variables for ``cnnjax.models.get(model_name, **model_kwargs)`` from a torchvision file.

    ``path``: a ``.safetensors`` file (read with numpy, no torch needed) or a
    ``.pth`` state dict (read with ``torch.load(..., weights_only=True)``, only
    when torch is installed). Keys ``features.N.weight/bias`` map in order onto
    the model's convolutions and ``classifier.N.*`` onto its dense layers; a
    ``module.`` prefix is ignored. Kernels are converted OIHW -> HWIO and
    (out, in) -> (in, out); the first dense layer after the flatten gets its
    inputs reordered from torchvision's (C, H, W) to cnnjax's (H, W, C).
    A file of only ``features.*`` loads into ``include_top=False``.

    Raises:
      WeightsError: unreadable file, or any missing, extra or misshapen array
        (all listed in one message, with the registered model the file fits).
    """
    path = os.fspath(path)
    model, label = _build(model_name, model_kwargs)
    state = _read_torchvision(path)
    features, classifier, unexpected = _torch_layers(state)
    expected = _expected_params(model)
    layers = _param_layers(model, expected)
    convs = [n for n in layers if len(expected[n].get("kernel", ())) == 4]
    denses = [n for n in layers if n not in convs]
    problems = []
    if unexpected:
        shown = ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else "")
        bn = " (batch-norm statistics: *_bn models are not supported)" if any(
            "running_" in k for k in unexpected) else ""
        problems.append(f"{len(unexpected)} unexpected key(s) in the file{bn}: {shown}")
    if len(features) != len(convs):
        problems.append(f"the file has {len(features)} conv layers (features.*), {label} has "
                        f"{len(convs)} ({', '.join(convs) or 'none'})")
    if len(classifier) != len(denses):
        problems.append(f"the file has {len(classifier)} linear layers (classifier.*), {label} "
                        f"has {len(denses)} ({', '.join(denses) or 'none'})")
    flatten_chw = _flatten_input(model)
    assigned, file_shapes = {}, []
    pairs = list(zip(features, convs, strict=False)) + list(zip(classifier, denses, strict=False))
    for (tv_name, group), name in pairs:
        chw = flatten_chw if denses and name == denses[0] else None
        if chw is not None and group.get("weight") is not None and \
                group["weight"].ndim == 2 and group["weight"].shape[1] != int(np.prod(chw)):
            chw = None  # reported as a shape mismatch below
        assigned[name] = _torch_to_cnnjax(tv_name, group, chw)
    for (_, group) in features + classifier:
        conv = _torch_to_cnnjax("", group)
        file_shapes.append(tuple(tuple(conv[k].shape) for k in sorted(conv)))
    return _check_and_build(path, label, expected, layers, assigned, problems, file_shapes,
                            source_names={name: tv for (tv, _), name in pairs})


# --------------------------------------------------------------------------- by type

def load(path: str | os.PathLike, model_name="vgg16", **model_kwargs) -> dict:
    """:func:`load_keras_h5` or :func:`load_torchvision`, chosen by the file's content."""
    if file_format(path) == "keras":
        return load_keras_h5(path, model_name, **model_kwargs)
    model_kwargs.pop("bgr_to_rgb", None)  # torchvision weights already take RGB
    return load_torchvision(path, model_name, **model_kwargs)


def input_normalization(path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on the [0, 1] RGB scale, for ``(x / 255 - mean) / std`` as the trainer does.

    For a Keras file this is the caffe mean subtraction on 0..255 written on
    that scale (mean (123.68, 116.779, 103.939) / 255, std 1 / 255), valid for a
    model loaded with ``bgr_to_rgb=True`` (as :func:`load_into` does); for a
    torchvision file it is ImageNet's mean and std. A file that is gone (an
    evaluation long after training) is judged by its extension.
    """
    try:
        fmt = file_format(path)
    except WeightsError:
        ext = os.path.splitext(os.fspath(path))[1].lower()
        fmt = "keras" if ext in (".h5", ".hdf5") else "torchvision"
    if fmt == "keras":
        return (tuple(m / 255.0 for m in KERAS_CAFFE_MEAN_BGR[::-1]), (1.0 / 255.0,) * 3)
    return IMAGENET_MEAN, IMAGENET_STD


def load_into(params: Mapping, model, path: str | os.PathLike) -> dict:
    """``params`` with the file's arrays put in; the model then takes [0, 1]-normalized RGB.

    For a :class:`~cnnjax.models.TransferModel` only its base (``params[model.base]``)
    is replaced, from a headless (notop / features-only) or full file of the
    base network; the head keeps its initialization. For any other model the
    file must fill every parameter. Keras files get ``bgr_to_rgb=True``;
    normalize inputs with :func:`input_normalization`.
    """
    from cnnjax.models.transfer import TransferModel

    params = dict(params)
    fmt = file_format(path)
    extra = {"bgr_to_rgb": True} if fmt == "keras" else {}
    if isinstance(model, TransferModel):
        base = model.base_model()
        try:
            loaded = load(path, base, **extra)["params"]
        except WeightsError as err:
            full = base.clone(include_top=True)
            try:  # a file with the classifier: keep its feature layers
                loaded = load(path, full, **extra)["params"]
            except WeightsError:
                raise err from None
            loaded = {k: v for k, v in loaded.items() if k in params[model.base]}
        params[model.base] = loaded
        return params
    loaded = load(path, model, **extra)["params"]
    return loaded


def pretrained(model_name: str, path: str | os.PathLike, *, rng=None,
               **model_kwargs) -> tuple[Any, dict]:
    """``(model, variables)``: ``get(model_name, **model_kwargs)`` with weights from ``path``.

    For a transfer model the head is initialized from ``rng`` (default key 0) and
    the base loaded, taking [0, 1]-normalized RGB (see :func:`input_normalization`);
    any other model gets exactly the file's parameters (Keras files then expect
    :func:`preprocess_keras_caffe` input, torchvision files
    :func:`preprocess_torchvision` input).
    """
    from cnnjax import models
    from cnnjax.models.transfer import TransferModel

    model = models.get(model_name, **model_kwargs)
    if isinstance(model, TransferModel):
        key = jax.random.key(0) if rng is None else rng
        variables = jax.jit(model.init)(key, jnp.zeros((1, *model.input_shape), jnp.float32))
        return model, {"params": load_into(variables["params"], model, path)}
    return model, load(path, model)
