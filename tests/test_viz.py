"""cnnjax.viz: every picture for a short digits run and an untrained VGG-16; the edge demo."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from cnnjax import viz
from cnnjax.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path) -> np.ndarray:
    """Checks the PNG signature, decodes with PIL and checks a sensible size."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE, path
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.format == "PNG"
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert 200 <= width <= 6000 and 120 <= height <= 4000, (path, im.size)
    assert pixels.std() > 5, f"{path} is (nearly) blank"
    return pixels


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape != b.shape or bool(np.any(a != b))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from cnnjax.train import default_config, train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("viz_run"))
    config = default_config()
    config.progress_bar = False
    config.num_epochs = 1
    config.log_every_steps = 10
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def run_pictures(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("viz_out")
    return viz.visualize_run(digits_run, out, index=5)


def test_every_run_picture_is_a_valid_png(run_pictures):
    expected = {"architecture", "filters", "feature_maps_conv1", "feature_maps_conv2",
                "feature_maps_conv3", "training_curves", "confusion_matrix", "worst_examples"}
    assert set(run_pictures) == expected
    pixels = {name: read_png(path) for name, path in run_pictures.items()}
    # Different layers give different pictures.
    assert differ(pixels["feature_maps_conv1"], pixels["feature_maps_conv2"])


def test_feature_maps_follow_the_input_image(digits_run, tmp_path, run_pictures):
    other = viz.visualize_run(digits_run, tmp_path, index=6)
    assert differ(read_png(other["feature_maps_conv1"]),
                  read_png(run_pictures["feature_maps_conv1"]))
    # An image file given by path goes through the same preprocessing.
    photo = tmp_path / "digit.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))).save(photo)
    from_file = viz.visualize_run(digits_run, tmp_path / "file", image=photo)
    read_png(from_file["feature_maps_conv2"])


def test_vgg16_untrained_shapes_only(tmp_path):
    paths = viz.visualize_model("vgg16", tmp_path / "vgg16")
    assert set(paths) == {"architecture", "filters"}
    arch = read_png(paths["architecture"])
    assert arch.shape[1] > 2 * arch.shape[0]  # 23 volumes in a row
    read_png(paths["filters"])


def test_pictures_differ_between_models(tmp_path):
    lenet = viz.visualize_model("lenet5", tmp_path / "lenet5")
    alexnet = viz.visualize_model("alexnet", tmp_path / "alexnet")
    for name in ("architecture", "filters"):
        assert differ(read_png(lenet[name]), read_png(alexnet[name])), name


def test_plot_functions_return_figures(digits_run, tmp_path):
    import cnnjax

    records = viz.load_metrics(digits_run)
    assert any("test_accuracy" in r for r in records)
    fig = viz.plot_training_curves(records)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert [ax.get_xlabel() for ax in fig.axes] == ["step"] * 3
    fig = viz.plot_architecture(cnnjax.models.get("lenet5"), path=tmp_path / "a.png")
    assert isinstance(fig, Figure) and os.path.exists(tmp_path / "a.png")
    labels = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 2, 2, 1]] * 0.8 + 0.2 / 3
    fig = viz.plot_confusion_matrix(labels, probs.argmax(-1))
    assert fig.axes[0].get_xlabel() == "predicted class"
    worst = viz.plot_worst_examples(np.zeros((4, 8, 8, 1), np.uint8), labels, probs, count=2)
    titles = [ax.get_title() for ax in worst.axes]
    assert titles[0].startswith("true 1") and "pred 2" in titles[0]


def test_confusion_matrix_counts_match(run_pictures, digits_run):
    run = viz.restore_run(digits_run)
    images, labels, probs = viz.predict(run)
    assert len(images) == len(labels) == len(probs) == run["source"].info.num_test
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    fig = viz.plot_confusion_matrix(labels, probs.argmax(-1))
    matrix = fig.axes[0].images[0].get_array()
    assert int(np.sum(matrix)) == len(labels)
    assert int(np.trace(matrix)) == int((probs.argmax(-1) == labels).sum())


# --------------------------------------------------------------------------- edges

def test_edge_filter_matches_direct_cross_correlation():
    rng = np.random.default_rng(0)
    gray = rng.random((9, 11)).astype(np.float32)
    got = viz.edge_responses(gray)["vertical edge"]
    kernel = viz.edge_filters()["vertical edge"]
    want = np.array([[np.sum(gray[i:i + 3, j:j + 3] * kernel) for j in range(9)]
                     for i in range(7)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_edge_response_is_largest_on_a_step_edge():
    gray = np.zeros((20, 30), np.float32)
    gray[:, 15:] = 1.0  # a vertical step between columns 14 and 15
    responses = viz.edge_responses(gray)
    for name in ("vertical edge", "Sobel x", "Sobel magnitude"):
        response = np.abs(responses[name])
        # VALID output column j sees input columns j..j+2: the step lies under j = 13, 14.
        on_edge = response[:, 13:15]
        flat = np.delete(response, [13, 14], axis=1)
        assert on_edge.min() >= 3.0, name
        assert flat.max() < 1e-6, name
    assert np.abs(responses["Sobel y"]).max() < 1e-6  # no horizontal edge anywhere


def test_edge_response_on_the_photo_follows_its_edges():
    gray = viz._to_gray(viz.sample_photo())
    magnitude = viz.edge_responses(gray)["Sobel magnitude"]
    # An independent edge map: numpy central differences on the same pixels.
    dy, dx = np.gradient(gray.astype(np.float64))
    strength = np.hypot(dx, dy)[1:-1, 1:-1]
    strong = strength >= np.quantile(strength, 0.98)
    flat = strength <= np.quantile(strength, 0.5)
    assert magnitude[strong].mean() > 10 * magnitude[flat].mean()
    # The sky (top rows, right of the pagoda) is flat; the pagoda's outline is not.
    sky = magnitude[5:60, 350:600]
    assert np.percentile(magnitude, 99) > 20 * np.median(sky)


def test_edge_demo_png(tmp_path):
    paths = viz.edge_demo(tmp_path)
    pixels = read_png(paths["edges"])
    assert pixels.shape[1] > pixels.shape[0]


# --------------------------------------------------------------------------- CLI

def test_cli_visualize(tmp_path, capsys, digits_run):
    assert main(["visualize", "--model", "lenet5", "--out", str(tmp_path / "m")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.basename(p) for p in printed) == ["architecture.png", "filters.png"]
    assert main(["visualize", "--demo", "edges", "--out", str(tmp_path / "d")]) == 0
    assert os.path.exists(tmp_path / "d" / "edges.png")
    assert main(["visualize"]) == 2
    assert main(["visualize", "--model", "vgg16", "--index", "3"]) == 2
    assert main(["visualize", "--workdir", digits_run, "--index", "100000",
                 "--out", str(tmp_path / "r")]) == 2
    assert "out of range" in capsys.readouterr().err
