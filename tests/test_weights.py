"""cnnjax.weights: Keras HDF5 and torchvision files written from known arrays, loaded back.

Round trips check that every array lands where it belongs; the torchvision
tests also check the flatten-order conversion by comparing logits with a
reference computed in NCHW (numpy always; torch's own layers when torch is
installed). Bad files must raise one WeightsError listing every problem.
"""

from __future__ import annotations

import os
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from cnnjax import layers as L
from cnnjax import models, weights
from cnnjax.models.base import Sequential, layer
from cnnjax.weights import WeightsError


def _random_params(model, rng) -> dict:
    """Known (random) float32 arrays in the model's parameter shapes."""
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32))
    return jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32),
                        dict(shapes["params"]))


def write_keras_h5(path, params, layer_names, *, style="W_1", wrap=False, skip=()):
    """The keras-applications legacy layout: layer_names, weight_names, nested datasets."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if wrap else f
        names = [n for n in layer_names if n not in skip]
        root.attrs["layer_names"] = np.array([n.encode() for n in ["input_1", *names]])
        root.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for name in names:
            group = root.create_group(name)
            if name not in params:  # pools, flatten: no weights
                group.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            if style == "W_1":
                wnames = [f"{name}/{name}_W_1:0", f"{name}/{name}_b_1:0"]
            else:
                wnames = [f"{name}/kernel:0", f"{name}/bias:0"]
            group.attrs["weight_names"] = np.array([w.encode() for w in wnames])
            group.create_dataset(wnames[0], data=params[name]["kernel"])
            group.create_dataset(wnames[1], data=params[name]["bias"])


def _assert_same(loaded, expected):
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded),
                            jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------- Keras

def test_keras_vgg16_notop_round_trip(tmp_path, rng):
    model = models.get("vgg16", include_top=False, input_shape=(32, 32, 3))
    params = _random_params(model, rng)
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_keras_h5(path, params, model.layer_names())
    variables = weights.load_keras_h5(path, "vgg16", include_top=False, input_shape=(32, 32, 3))
    _assert_same(variables["params"], params)
    assert weights.load(path, model)["params"].keys() == params.keys()  # by content
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    out = model.apply(variables, weights.preprocess_keras_caffe(x))
    assert out.shape == (2, 1, 1, 512)


def test_keras_full_file_kernel_names_and_model_weights_group(tmp_path, rng):
    model = models.get("lenet5")
    params = _random_params(model, rng)
    path = tmp_path / "lenet.h5"
    write_keras_h5(path, params, model.layer_names(), style="kernel", wrap=True)
    _assert_same(weights.load(path, "lenet5")["params"], params)


def test_keras_bgr_to_rgb_flips_the_first_conv(tmp_path, rng):
    model = models.get("vgg16", include_top=False, input_shape=(32, 32, 3))
    params = _random_params(model, rng)
    path = tmp_path / "notop.h5"
    write_keras_h5(path, params, model.layer_names())
    bgr = weights.load_keras_h5(path, model)
    rgb = weights.load_keras_h5(path, model, bgr_to_rgb=True)
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    keras_way = model.apply(bgr, weights.preprocess_keras_caffe(x))
    mean, std = weights.input_normalization(path)
    trainer_way = model.apply(rgb, (x / 255.0 - np.array(mean)) / np.array(std))
    scale = float(np.abs(keras_way).max())  # float32 rounding of two different sums
    np.testing.assert_allclose(trainer_way, keras_way, rtol=0, atol=1e-5 * scale)


def test_preprocessing_functions():
    x = np.zeros((1, 1, 1, 3), np.uint8)
    x[..., 0] = 255  # pure red
    caffe = np.asarray(weights.preprocess_keras_caffe(x))[0, 0, 0]
    np.testing.assert_allclose(caffe, [-103.939, -116.779, 255 - 123.68], rtol=1e-6)
    torch_way = np.asarray(weights.preprocess_torchvision(x))[0, 0, 0]
    np.testing.assert_allclose(torch_way, [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225],
                               rtol=1e-6)


def test_keras_mismatches_are_listed_together_with_the_model_that_fits(tmp_path, rng):
    lenet = models.get("lenet5", num_classes=7)
    params = _random_params(lenet, rng)
    path = tmp_path / "lenet7.h5"
    write_keras_h5(path, params, lenet.layer_names())
    with pytest.raises(WeightsError) as err:
        weights.load(path, "lenet5")  # 10 classes
    text = str(err.value)
    assert "fc2/kernel: file has shape (84, 7), lenet5 expects (84, 10)" in text
    assert "fc2/bias: file has shape (7,), lenet5 expects (10,)" in text
    assert "2 problem(s)" in text
    assert "fits lenet5(num_classes=7)" in text

    # A missing layer and a wrong-model file.
    broken = tmp_path / "missing.h5"
    write_keras_h5(broken, params, lenet.layer_names(), skip=("conv3",))
    with pytest.raises(WeightsError, match=r"layer\(s\) missing from the file: conv3"):
        weights.load(broken, "lenet5", num_classes=7)
    with pytest.raises(WeightsError) as err:
        weights.load(path, "vgg16", include_top=False, input_shape=(32, 32, 3))
    text = str(err.value)
    for name in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        assert f"layer {name} in the file is not in vgg16" in text
    assert "block1_conv1 (kernel (3, 3, 3, 64)" in text
    assert "fits lenet5(num_classes=7)" in text


def test_keras_notop_file_for_a_model_with_top_says_include_top(tmp_path, rng):
    model = models.get("lenet5", include_top=False)
    params = _random_params(model, rng)
    path = tmp_path / "lenet_notop.h5"
    write_keras_h5(path, params, model.layer_names())
    with pytest.raises(WeightsError) as err:
        weights.load(path, "lenet5")
    assert "layer(s) missing from the file: fc1" in str(err.value)
    assert "lenet5(include_top=False)" in str(err.value)
    assert "pass include_top=False" in str(err.value)


def test_corrupt_and_foreign_files(tmp_path, rng):
    model = models.get("lenet5")
    path = tmp_path / "lenet.h5"
    write_keras_h5(path, _random_params(model, rng), model.layer_names())
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        weights.load(truncated, "lenet5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(WeightsError, match="not a Keras legacy HDF5 weights file"):
        weights.load(tmp_path / "other.h5", "lenet5")
    with pytest.raises(WeightsError, match="does not exist"):
        weights.load(tmp_path / "nowhere.h5", "lenet5")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match="neither HDF5"):
        weights.load(tmp_path / "notes.txt", "lenet5")


# --------------------------------------------------------------------------- torchvision

def _tiny_torch_style_model():
    """conv(3->4, 3x3, pad 1) relu, maxpool 2, flatten (3x3x4), linear 36->5 relu, linear 5->3."""
    return Sequential(input_shape=(6, 6, 3), layer_specs=(
        layer("conv1", L.Conv, features=4, kernel_size=3, padding=1, activation="relu"),
        layer("pool1", L.MaxPool, window=2, stride=2),
        layer("flatten", L.Flatten),
        layer("fc1", L.Dense, features=5, activation="relu"),
        layer("fc2", L.Dense, features=3),
    ))


def _numpy_nchw_reference(state, x_nchw):
    """The tiny model computed the torch way: NCHW, OIHW, flatten C,H,W, y = x W^T + b."""
    w, b = state["features.0.weight"], state["features.0.bias"]
    n, c, h, wd = x_nchw.shape
    xp = np.pad(x_nchw, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd), np.float64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    out = np.maximum(out + b[None, :, None, None], 0)
    out = out.reshape(n, w.shape[0], h // 2, 2, wd // 2, 2).max(axis=(3, 5))
    flat = out.reshape(n, -1)  # C, H, W order
    hidden = np.maximum(flat @ state["classifier.1.weight"].T + state["classifier.1.bias"], 0)
    return hidden @ state["classifier.3.weight"].T + state["classifier.3.bias"]


def _tiny_state(rng):
    return {
        "features.0.weight": rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32),
        "features.0.bias": rng.normal(0, 0.1, (4,)).astype(np.float32),
        "classifier.1.weight": rng.normal(0, 0.5, (5, 36)).astype(np.float32),
        "classifier.1.bias": rng.normal(0, 0.1, (5,)).astype(np.float32),
        "classifier.3.weight": rng.normal(0, 0.5, (3, 5)).astype(np.float32),
        "classifier.3.bias": rng.normal(0, 0.1, (3,)).astype(np.float32),
    }


def test_torchvision_safetensors_flatten_order_matches_an_nchw_reference(tmp_path, rng):
    from safetensors.numpy import save_file

    state = _tiny_state(rng)
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    model = _tiny_torch_style_model()
    variables = weights.load(path, model)
    p = variables["params"]
    np.testing.assert_array_equal(p["conv1"]["kernel"],
                                  state["features.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["fc2"]["kernel"], state["classifier.3.weight"].T)
    # fc1's rows are permuted: not a plain transpose.
    assert not np.array_equal(p["fc1"]["kernel"], state["classifier.1.weight"].T)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    expected = _numpy_nchw_reference(state, x.astype(np.float64))
    got = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def test_torchvision_problems_are_listed_together(tmp_path, rng):
    from safetensors.numpy import save_file

    state = _tiny_state(rng)
    state["classifier.3.weight"] = state["classifier.3.weight"][:2]
    state["features.1.running_mean"] = np.zeros(4, np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        weights.load(path, _tiny_torch_style_model())
    text = str(err.value)
    assert "unexpected key(s) in the file (batch-norm statistics" in text
    assert "classifier.3 -> fc2/kernel: file has shape (5, 2) after conversion" in text
    assert "classifier.3 -> fc2/bias: file has shape (3,)" not in text

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        weights.load(truncated, _tiny_torch_style_model())


def test_torchvision_file_for_another_model_says_which(tmp_path, rng):
    from safetensors.numpy import save_file

    # A features-only file of the right shapes for lenet5 without top, loaded as allconv.
    lenet = models.get("lenet5", include_top=False)
    params = _random_params(lenet, rng)
    state = {}
    for i, name in enumerate(("conv1", "conv2", "conv3")):
        # (safetensors writes an array's buffer as is: make the transposed view contiguous)
        state[f"features.{3 * i}.weight"] = np.ascontiguousarray(
            params[name]["kernel"].transpose(3, 2, 0, 1))
        state[f"features.{3 * i}.bias"] = params[name]["bias"]
    path = tmp_path / "lenet_features.safetensors"
    save_file(state, str(path))
    _assert_same(weights.load(path, "lenet5", include_top=False)["params"], params)
    with pytest.raises(WeightsError) as err:
        weights.load(path, "allconv", include_top=False)
    text = str(err.value)
    assert "the file has 3 conv layers (features.*), allconv(include_top=False) has 8" in text
    assert "The file fits lenet5(include_top=False)" in text


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(WeightsError, match="needs torch, which is not installed"):
        weights.load(path, "alexnet_torchvision")


def _torch_alexnet(num_classes):
    """torchvision.models.AlexNet's modules, same names (torchvision itself is not needed)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(0.5), nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(0.5),
                nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    torch.manual_seed(0)
    return torch, AlexNet().eval()


@pytest.mark.parametrize("size", [224, 256])
def test_alexnet_torchvision_logits_match_torch(tmp_path, rng, size):
    torch, net = _torch_alexnet(num_classes=10)
    from safetensors.torch import save_file

    path = tmp_path / "alexnet.safetensors"
    save_file(net.state_dict(), str(path))
    model = models.get("alexnet_torchvision", num_classes=10, input_shape=(size, size, 3))
    variables = weights.load(path, model)
    x = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(
            np.asarray(weights.preprocess_torchvision(x)).transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(jax.jit(model.apply)(variables, weights.preprocess_torchvision(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_pth_round_trip_and_truncated_pth(tmp_path):
    torch, net = _torch_alexnet(num_classes=3)
    path = tmp_path / "alexnet.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    variables = weights.load(path, "alexnet_torchvision", num_classes=3)
    np.testing.assert_array_equal(variables["params"]["conv2"]["kernel"],
                                  net.features[3].weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc8"]["kernel"],
                                  net.classifier[6].weight.detach().numpy().T)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 3])
    with pytest.raises(WeightsError, match="truncated, corrupt"):
        weights.load(truncated, "alexnet_torchvision", num_classes=3)


@pytest.mark.slow
def test_full_vgg16_torchvision_logits_match_torch(tmp_path, rng):
    """torchvision's VGG-16 layout (adaptive 7x7 pool, C,H,W flatten) at full size: 528 MB."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
           512, 512, 512, "M"]
    feats, c = [], 3
    for v in cfg:
        if v == "M":
            feats.append(nn.MaxPool2d(2, 2))
        else:
            feats += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*feats)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(25088, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 4096),
                nn.ReLU(), nn.Dropout(), nn.Linear(4096, 1000))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    torch.manual_seed(0)
    net = VGG().eval()
    from safetensors.torch import save_file

    path = tmp_path / "vgg16-397923af.safetensors"
    save_file(net.state_dict(), str(path))
    assert weights.weight_set(path).params == 138_357_544
    model, variables = models.pretrained("vgg16", path, dropout_rate=0.5)
    x = rng.uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(
            np.asarray(weights.preprocess_torchvision(x)).transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(jax.jit(model.apply)(variables, weights.preprocess_torchvision(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- metadata, models

def test_alexnet_torchvision_shapes_and_count():
    s = cnnjax.summary(models.get("alexnet_torchvision"), (224, 224, 3))
    shapes = {r.name: r.output_shape_text for r in s.rows}
    assert shapes["conv1"] == "(None, 55, 55, 64)"
    assert shapes["pool5"] == "(None, 6, 6, 256)"
    assert shapes["avgpool"] == "(None, 6, 6, 256)"
    assert s.total_params == 61_100_840


def test_weight_sets_match_the_models():
    for name, ws in weights.WEIGHT_SETS.items():
        model = models.get(ws.model, **dict(ws.model_kwargs))
        assert cnnjax.summary(model, ws.input_size).total_params == ws.params, name
        assert ws.url.endswith(name)
        assert ws.preprocess is getattr(weights, ws.preprocessing)
    assert weights.weight_set("some/dir/vgg19-dcbb9e9d.safetensors").top1 == 72.376
    assert weights.weight_set("mine.h5") is None


def test_adaptive_avg_pool_bins_match_pytorch():
    from cnnjax.models.torchvision_alexnet import AdaptiveAvgPool, adaptive_bins

    assert adaptive_bins(7, 6) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7)]
    x = jnp.arange(2 * 7 * 7 * 1, dtype=jnp.float32).reshape(2, 7, 7, 1)
    y = AdaptiveAvgPool((6, 6)).apply({}, x)
    np.testing.assert_allclose(y[0, 0, 0, 0], np.mean(np.asarray(x)[0, 0:2, 0:2, 0]))
    z = jnp.ones((1, 6, 6, 2))
    assert AdaptiveAvgPool((6, 6)).apply({}, z) is z
