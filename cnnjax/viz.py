"""Pictures of a network: filters, feature maps, curves, errors, architecture, edges.

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` (shown
inline by Jupyter) and, when ``path`` is given, also writes it there as a PNG.
The figures are built with the object-oriented API on the Agg canvas, never
through ``pyplot``: nothing needs a display, no global figure list grows, and a
notebook's own backend is left alone. The ``visualize_*`` / ``edge_demo``
functions write a set of PNGs and return ``{name: path}``; they are what
``cnnjax visualize`` calls, so the shell and a notebook give the same files::

    from cnnjax import viz
    viz.visualize_run("runs/lenet5_digits", index=3)     # filters, maps, curves, ...
    viz.visualize_model("vgg16", "viz/vgg16")            # shapes only, no training
    viz.edge_demo("viz/edges")                           # the lecture's edge filters
    fig = viz.plot_architecture(cnnjax.models.get("alexnet"))   # a Figure in a notebook

Shapes follow the code base: activations NHWC, kernels HWIO.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Polygon, Rectangle

__all__ = [
    "RunArtifacts",
    "edge_demo",
    "edge_filters",
    "edge_responses",
    "first_conv_kernel",
    "load_image",
    "load_metrics",
    "plot_architecture",
    "plot_confusion_matrix",
    "plot_edge_demo",
    "plot_feature_maps",
    "plot_filters",
    "plot_training_curves",
    "plot_worst_examples",
    "predict",
    "restore_run",
    "sample_photo",
    "save",
    "visualize_model",
    "visualize_run",
]

DPI = 110


# --------------------------------------------------------------------------- figure plumbing

def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | os.PathLike) -> str:
    """Writes ``fig`` as a PNG at ``path`` (parent folders created); returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white", bbox_inches="tight",
                pad_inches=0.15)
    return path


def _finish(fig: Figure, path) -> Figure:
    if path is not None:
        save(fig, path)
    return fig


def _grid(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(n, max_cols, max(1, math.ceil(math.sqrt(n * 1.5))))
    return math.ceil(n / cols), cols


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- filters

def first_conv_kernel(variables: Mapping, model: Any = None) -> tuple[str, np.ndarray]:
    """``(layer name, kernel)`` of the first layer with a 4-D HWIO kernel.

    Layer order is ``model.layer_names()`` when the model has it (every cnnjax
    model), else the order of ``variables["params"]``.
    """
    params = variables.get("params", variables)
    names = list(params)
    if model is not None and hasattr(model, "layer_names"):
        names = [n for n in model.layer_names() if n in params] + \
            [n for n in params if n not in set(model.layer_names())]
    for name in names:
        entry = params[name]
        kernel = entry.get("kernel") if isinstance(entry, Mapping) else None
        if kernel is not None and getattr(kernel, "ndim", 0) == 4:
            return name, np.asarray(kernel, np.float32)
    raise ValueError("variables hold no conv layer (a 4-D 'kernel'); "
                     "plot_filters needs a model with at least one Conv layer.")


def plot_filters(kernel, *, title: str = "first-layer filters", max_filters: int = 96,
                 path: str | os.PathLike | None = None) -> Figure:
    """The filters of one conv layer as an image grid.

    ``kernel`` is HWIO ``(F_h, F_w, C_in, K)``. With 3 input channels each filter
    is shown as a colour patch (its own min..max mapped to 0..1, as in the
    AlexNet paper's figure); otherwise input channel 0 of every filter is drawn
    with a diverging colormap on one shared, zero-centred scale with a colour bar.
    At most ``max_filters`` filters are drawn.
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be HWIO (F_h, F_w, C_in, K), got shape {kernel.shape}.")
    fh, fw, cin, k = kernel.shape
    n = min(k, max_filters)
    rows, cols = _grid(n, max_cols=12)
    fig = _figure(max(4.0, 0.75 * cols + 1.2), max(2.5, 0.75 * rows + 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    rgb = cin == 3
    limit = float(np.abs(kernel[:, :, 0 if not rgb else slice(None), :n]).max()) or 1.0
    image = None
    for i, ax in enumerate(axes.flat):
        _off(ax)
        if i >= n:
            ax.set_axis_off()
            continue
        f = kernel[..., i]
        if rgb:
            lo, hi = f.min(), f.max()
            ax.imshow((f - lo) / (hi - lo + 1e-12), interpolation="nearest")
        else:
            image = ax.imshow(f[..., 0], cmap="RdBu_r", vmin=-limit, vmax=limit,
                              interpolation="nearest")
        ax.set_title(str(i), fontsize=7, pad=2)
    shape = f"{fh}x{fw}x{cin}, {k} filters" + (f" (first {n})" if n < k else "")
    how = "RGB, each scaled to its own range" if rgb else (
        "input channel 0" if cin > 1 else "weights")
    fig.suptitle(f"{title}: {shape}; {how}", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="weight")
    return _finish(fig, path)


# --------------------------------------------------------------------------- feature maps

def _show_input(ax, image) -> None:
    image = np.asarray(image, np.float32)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray")
    else:
        lo, hi = image.min(), image.max()
        ax.imshow((image - lo) / (hi - lo + 1e-12))
    _off(ax)


def plot_feature_maps(name: str, maps, *, image=None, max_channels: int = 32,
                      path: str | os.PathLike | None = None) -> Figure:
    """One layer's feature maps for one example: a grid of its channels.

    ``maps`` is ``(H, W, C)`` (or ``(1, H, W, C)``); ``image`` (H, W, C), when
    given, is drawn first for reference. All channels share one colour scale
    (with a colour bar), so strong and dead channels are told apart. A layer
    with 1x1 spatial size is drawn as one grid of its C values.
    """
    maps = np.asarray(maps, np.float32)
    if maps.ndim == 4:
        maps = maps[0]
    if maps.ndim != 3:
        raise ValueError(f"maps must be (H, W, C), got shape {maps.shape}.")
    h, w, c = maps.shape
    title = f"{name}: output {h}x{w}x{c}"
    if h * w == 1:  # a vector of C activations: one heat map of the values
        rows, cols = _grid(c, max_cols=20)
        values = np.full(rows * cols, np.nan, np.float32)
        values[:c] = maps.reshape(-1)
        fig = _figure(7.5, 1.6 + 0.35 * rows)
        axes = fig.subplots(1, 2 if image is not None else 1, squeeze=False,
                            width_ratios=[1, 4] if image is not None else None)
        if image is not None:
            _show_input(axes[0, 0], image)
            axes[0, 0].set_title("input", fontsize=9)
        ax = axes[0, -1]
        shown = ax.imshow(values.reshape(rows, cols), cmap="viridis", interpolation="nearest")
        ax.set_title(f"{c} channels of size 1x1 (row-major, {cols} per row)", fontsize=9)
        _off(ax)
        fig.colorbar(shown, ax=ax, label="activation")
        fig.suptitle(title, fontsize=11)
        return _finish(fig, path)
    n = min(c, max_channels)
    panels = n + (image is not None)
    rows, cols = _grid(panels, max_cols=8)
    fig = _figure(1.45 * cols + 1.4, 1.5 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    lo, hi = float(maps[..., :n].min()), float(maps[..., :n].max())
    flat = list(axes.flat)
    if image is not None:
        _show_input(flat[0], image)
        flat[0].set_title("input", fontsize=8)
        flat = flat[1:]
    shown = None
    for i, ax in enumerate(flat):
        _off(ax)
        if i >= n:
            ax.set_axis_off()
            continue
        shown = ax.imshow(maps[..., i], cmap="viridis", vmin=lo, vmax=hi + 1e-12,
                          interpolation="nearest")
        ax.set_title(f"ch {i}", fontsize=8)
    if n < c:
        title += f" (first {n} channels)"
    fig.suptitle(title, fontsize=11)
    fig.colorbar(shown, ax=axes, shrink=0.8, label="activation")
    return _finish(fig, path)


def _conv_layer_names(model, activations: Mapping) -> list[str]:
    names = list(activations)
    if hasattr(model, "layers"):
        from cnnjax import layers as L

        conv = {spec.name for spec in model.layers() if spec.cls is L.Conv}
        return [n for n in names if n in conv]
    return [n for n in names if "conv" in n]


# --------------------------------------------------------------------------- training curves

def load_metrics(path_or_workdir: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl`` (a workdir or the file itself)."""
    path = os.fspath(path_or_workdir)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics file at {path}; train first with "
                                "`cnnjax train --workdir DIR`.")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(metrics: str | os.PathLike | Iterable[Mapping], *,
                         title: str = "training curves",
                         path: str | os.PathLike | None = None) -> Figure:
    """Loss, accuracy and learning rate against step.

    ``metrics`` is a workdir, a ``metrics.jsonl`` path, or its records. Train
    values come from the periodic log lines, test values from the end-of-epoch
    evaluations (markers).
    """
    records = load_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    if not records:
        raise ValueError("no metric records to plot.")

    def series(key: str, where) -> tuple[list, list]:
        pts = [(r["step"], r[key]) for r in records
               if where(r) and r.get(key) is not None and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    is_eval = lambda r: any(k.startswith("test_") for k in r)  # noqa: E731
    is_log = lambda r: not is_eval(r)  # noqa: E731
    fig = _figure(12.0, 3.6)
    axes = fig.subplots(1, 3)
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"),
                              (axes[1], "accuracy", "accuracy")):
        xs, ys = series(f"train_{metric}", is_log)
        if not xs:  # no periodic logs: use the per-epoch train means
            xs, ys = series(f"train_{metric}", is_eval)
        if xs:
            ax.plot(xs, ys, color="tab:blue", label="train")
        xs, ys = series(f"test_{metric}", is_eval)
        if xs:
            ax.plot(xs, ys, "o-", color="tab:orange", label="test (end of epoch)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    axes[1].set_ylim(top=1.0)
    xs, ys = series("learning_rate", lambda r: True)
    axes[2].plot(xs, ys, color="tab:green")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("learning rate")
    axes[2].set_title("learning rate")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[2].grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _finish(fig, path)


# --------------------------------------------------------------------------- errors

def plot_confusion_matrix(labels, predictions, *, class_names: Sequence[str] | None = None,
                          title: str = "confusion matrix (test set)",
                          path: str | os.PathLike | None = None) -> Figure:
    """Counts of (true class, predicted class), with the counts written in the cells."""
    from sklearn.metrics import confusion_matrix

    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    k = int(max(labels.max(initial=0), predictions.max(initial=0)) + 1)
    if class_names is not None:
        k = max(k, len(class_names))
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    matrix = confusion_matrix(labels, predictions, labels=list(range(k)))
    size = min(14.0, 2.6 + 0.32 * k)
    fig = _figure(size + 1.2, size)
    ax = fig.subplots()
    shown = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    if k <= 30:
        ax.set_xticks(range(k), names[:k], rotation=90 if k > 10 else 0, fontsize=8)
        ax.set_yticks(range(k), names[:k], fontsize=8)
        threshold = matrix.max() / 2
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if matrix[i, j] > threshold else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = float(np.trace(matrix)) / max(1, matrix.sum())
    ax.set_title(f"{title}: {matrix.sum()} examples, accuracy {accuracy:.1%}", fontsize=10)
    fig.colorbar(shown, ax=ax, shrink=0.8, label="examples")
    return _finish(fig, path)


def plot_worst_examples(images, labels, probabilities, *, count: int = 10,
                        class_names: Sequence[str] | None = None,
                        title: str = "worst-classified test images",
                        path: str | os.PathLike | None = None) -> Figure:
    """The ``count`` examples with the lowest probability of their true class.

    ``images`` (N, H, W, C) uint8 or float; ``probabilities`` (N, classes).
    Each panel says the true and predicted class and both probabilities
    (red title: misclassified).
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probabilities, np.float32)
    true_p = probs[np.arange(len(labels)), labels]
    order = np.argsort(true_p, kind="stable")[:min(count, len(labels))]
    names = list(class_names) if class_names is not None else None
    name = (lambda i: names[i]) if names else str
    cols = max(1, len(order))
    fig = _figure(max(4.0, 1.45 * cols), 2.3)
    axes = fig.subplots(1, cols, squeeze=False)[0]
    for ax, i in zip(axes, order, strict=True):
        _show_input(ax, images[i])
        pred = int(probs[i].argmax())
        ax.set_title(f"true {name(int(labels[i]))} ({true_p[i]:.2f})\n"
                     f"pred {name(pred)} ({probs[i, pred]:.2f})", fontsize=8,
                     color="tab:red" if pred != labels[i] else "black")
    wrong = int((probs.argmax(-1) != labels).sum())
    fig.suptitle(f"{title}: lowest probability of the true class "
                 f"({wrong} of {len(labels)} misclassified)", fontsize=10)
    return _finish(fig, path)


# --------------------------------------------------------------------------- architecture

# (legend label, colour) per layer type; pools share one entry.
_KINDS = {"input": ("input", "#BBBBBB"), "Conv": ("conv", "#4C72B0"),
          "MaxPool": ("pool", "#DD8452"), "AvgPool": ("pool", "#DD8452"),
          "L2Pool": ("pool", "#DD8452"), "GlobalAvgPool": ("pool", "#DD8452"),
          "GlobalMaxPool": ("pool", "#DD8452"), "LRN": ("LRN", "#8172B3"),
          "Flatten": ("flatten", "#937860"), "Dense": ("dense", "#55A868"),
          "Dropout": ("dropout", "#DA8BC3")}


def _kind(kind: str) -> tuple[str, str]:
    return _KINDS.get(kind, (kind.lower(), "#8C8C8C"))


def _spatial(n: int) -> float:
    return math.sqrt(n)


def _depth(n: int) -> float:
    return 0.9 * (math.log2(n) + 1.0)


def _cuboid(ax, x: float, height: float, thickness: float, width: float, colour: str,
            zorder: float) -> tuple[float, float]:
    """Draws H x D front face at x with an oblique W side; returns (right edge, top)."""
    dx, dy = 0.45 * width, 0.35 * width
    y0 = -height / 2
    front = Rectangle((x, y0), thickness, height, facecolor=colour, edgecolor="black",
                      linewidth=0.6, zorder=zorder)
    top = Polygon([(x, y0 + height), (x + dx, y0 + height + dy),
                   (x + thickness + dx, y0 + height + dy), (x + thickness, y0 + height)],
                  closed=True, facecolor=colour, alpha=0.6, edgecolor="black",
                  linewidth=0.6, zorder=zorder)
    side = Polygon([(x + thickness, y0), (x + thickness + dx, y0 + dy),
                    (x + thickness + dx, y0 + height + dy), (x + thickness, y0 + height)],
                   closed=True, facecolor=colour, alpha=0.8, edgecolor="black",
                   linewidth=0.6, zorder=zorder)
    for patch in (front, top, side):
        ax.add_patch(patch)
    return x + thickness + dx, y0 + height + dy


def plot_architecture(model, input_shape: Sequence[int] | None = None, *,
                      title: str | None = None,
                      path: str | os.PathLike | None = None) -> Figure:
    """The network as a row of volumes, one per layer, with shapes and parameters.

    Each layer's output H x W x D is a box, as in the lecture's LeNet and VGG
    diagrams: box height and oblique side grow with sqrt(H) and sqrt(W), box
    thickness with log2(D) + 1, so both a 32x32x1 LeNet input and VGG's
    224x224x64 / 7x7x512 volumes fit one picture. A flat vector (Dense,
    Flatten) of N units is a thin bar of height log2(N) + 1 on the same scale as
    the depths. Under each box: name, type, output shape and parameter count.
    Shapes come from :func:`cnnjax.summary` (``jax.eval_shape``), so an
    untrained VGG-16 is drawn without allocating its parameters.
    """
    from cnnjax.summary import summary

    table = summary(model, input_shape)
    shape0 = tuple(input_shape or getattr(model, "input_shape", table.rows[0].output_shape[1:]))
    entries = [("input", "input", tuple(shape0), 0)]
    entries += [(r.name, r.type, tuple(r.output_shape[1:]), r.params) for r in table.rows]

    gap = 1.6
    x = 0.0
    placed = []
    for i, (name, kind, shape, params) in enumerate(entries):
        if len(shape) == 3:
            h, w, d = shape
            height, width, thickness = _spatial(h), _spatial(w), _depth(d)
        else:
            units = int(np.prod(shape)) if shape else 1
            height, width, thickness = _depth(units), 0.0, 0.6
        placed.append((x, height, thickness, width))
        right = x + thickness + 0.45 * width
        x = max(right, x + 1.0) + gap  # at least one label's room between neighbours
        del i, name, kind, params
    span = x - gap
    max_top = max(p[1] / 2 + 0.35 * p[3] for p in placed)
    max_bottom = max(p[1] / 2 for p in placed)

    # Figure size from data units; labels are rotated text below the boxes.
    unit = min(0.14, 22.0 / span)  # inches per unit, the whole row at most ~22 in
    longest = max(len(_arch_label(e)) for e in entries)
    label_in = 0.062 * longest + 0.15
    width_in = max(6.0, span * unit + 1.0)
    height_in = (max_top + max_bottom) * unit + label_in + 1.3
    fig = _figure(width_in, height_in)
    ax = fig.subplots()
    for idx, ((name, kind, shape, params), (x0, height, thickness, width)) in enumerate(
            zip(entries, placed, strict=True)):
        colour = _kind(kind)[1]
        _cuboid(ax, x0, height, thickness, width, colour, zorder=len(entries) - idx)
        ax.text(x0 + thickness / 2, -max_bottom - 0.8, _arch_label((name, kind, shape, params)),
                rotation=90, ha="center", va="top", fontsize=8, family="monospace")
    label_units = label_in / unit
    ax.set_xlim(-1.0, span + 1.0)
    ax.set_ylim(-max_bottom - 0.8 - label_units, max_top + 1.0)
    ax.set_aspect("equal")
    ax.set_axis_off()
    legend = {}
    for _, kind, _, _ in entries:
        label, colour = _kind(kind)
        legend.setdefault(label, colour)
    fig.legend(handles=[Patch(facecolor=c, edgecolor="black", label=label)
                        for label, c in legend.items()],
               loc="outside lower center", fontsize=8, ncols=len(legend), frameon=False)
    name = title or table.model_name
    fig.suptitle(f"{name}: {table.total_params:,} parameters; box = output volume "
                 "(height, side ~ sqrt(H), sqrt(W); thickness ~ log2(D)+1)", fontsize=10)
    return _finish(fig, path)


def _arch_label(entry) -> str:
    name, kind, shape, params = entry
    dims = "x".join(str(d) for d in shape)
    text = f"{name} {dims}"
    return text + (f"  {params:,} params" if params else "")


# --------------------------------------------------------------------------- edge demo

def edge_filters() -> dict[str, np.ndarray]:
    """The hand-set 3x3 filters of the demo, as ``{name: (3, 3) array}``.

    ``vertical edge`` is the lecture's hand-set edge detector (bright-to-dark
    steps from left to right give positive responses); ``Sobel x`` and
    ``Sobel y`` are the smoothed horizontal and vertical derivatives.
    """
    vertical = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], np.float32)
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    return {"vertical edge": vertical, "Sobel x": sobel_x, "Sobel y": sobel_x.T.copy()}


def edge_responses(gray) -> dict[str, np.ndarray]:
    """Each :func:`edge_filters` filter applied to ``gray`` (H, W) with ``cnnjax.ops.conv2d``.

    One conv2d call with the three filters stacked as HWIO ``(3, 3, 1, 3)``,
    VALID padding (no zero border, so no false edges at the frame), giving
    (H-2, W-2) maps; plus ``"Sobel magnitude"`` = sqrt(Sobel x^2 + Sobel y^2).
    """
    import jax.numpy as jnp

    from cnnjax.ops import conv2d

    gray = np.asarray(gray, np.float32)
    if gray.ndim != 2:
        raise ValueError(f"gray must be a 2-D (H, W) image, got shape {gray.shape}.")
    filters = edge_filters()
    kernel = np.stack(list(filters.values()), axis=-1)[:, :, None, :]
    out = np.asarray(conv2d(jnp.asarray(gray)[None, :, :, None], jnp.asarray(kernel),
                            padding="VALID"))[0]
    result = {name: out[..., i] for i, name in enumerate(filters)}
    result["Sobel magnitude"] = np.hypot(result["Sobel x"], result["Sobel y"])
    return result


def sample_photo(name: str = "china.jpg") -> np.ndarray:
    """A real photo shipped with scikit-learn (``china.jpg`` or ``flower.jpg``), uint8 RGB."""
    from sklearn.datasets import load_sample_image

    return np.asarray(load_sample_image(name))


def _to_gray(image) -> np.ndarray:
    image = np.asarray(image)
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    image = image.astype(np.float32) / scale
    if image.ndim == 3 and image.shape[-1] == 3:
        return image @ np.array([0.299, 0.587, 0.114], np.float32)
    if image.ndim == 3:
        return image[..., 0]
    return image


def plot_edge_demo(image=None, *, path: str | os.PathLike | None = None) -> Figure:
    """Input photo, its gray version, the filters, and each filter's response.

    ``image`` is (H, W, 3) / (H, W) uint8 or float in [0, 1]; default the
    scikit-learn ``china.jpg`` photo. Responses share the photo's pixel grid
    (minus the one-pixel VALID border) and use a zero-centred colour bar.
    """
    image = sample_photo() if image is None else np.asarray(image)
    gray = _to_gray(image)
    responses = edge_responses(gray)
    h, w = gray.shape
    aspect = h / w
    fig = _figure(16.0, 2 * 4.0 * aspect + 1.6)
    grid = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(grid[0, 0])
    if image.ndim == 3 and image.shape[-1] == 3:
        ax.imshow(image)
    else:
        ax.imshow(gray, cmap="gray")
    ax.set_title(f"input photo {w}x{h}", fontsize=10)
    _off(ax)
    ax = fig.add_subplot(grid[0, 1])
    shown = ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
    ax.set_title("gray input to conv2d", fontsize=10)
    _off(ax)
    fig.colorbar(shown, ax=ax, shrink=0.8, label="intensity")
    kernels = grid[0, 2:].subgridspec(1, 3)
    for i, (name, kernel) in enumerate(edge_filters().items()):
        ax = fig.add_subplot(kernels[0, i])
        ax.imshow(kernel, cmap="RdBu_r", vmin=-2, vmax=2)
        for (r, c), v in np.ndenumerate(kernel):
            ax.text(c, r, f"{v:g}", ha="center", va="center", fontsize=10,
                    color="white" if abs(v) >= 2 else "black")
        ax.set_title(f"filter: {name}", fontsize=9)
        _off(ax)
    for i, (name, response) in enumerate(responses.items()):
        ax = fig.add_subplot(grid[1, i])
        if name == "Sobel magnitude":
            shown = ax.imshow(response, cmap="magma", vmin=0,
                              vmax=float(np.percentile(response, 99.5)))
        else:
            limit = float(np.percentile(np.abs(response), 99.5)) or 1.0
            shown = ax.imshow(response, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"response: {name}", fontsize=10)
        _off(ax)
        fig.colorbar(shown, ax=ax, shrink=0.8, label="response")
    fig.suptitle("hand-set edge filters applied with cnnjax.ops.conv2d "
                 "(3x3, stride 1, VALID): large |response| = edge", fontsize=11)
    return _finish(fig, path)


def edge_demo(out: str | os.PathLike = "viz", image=None) -> dict[str, str]:
    """Writes ``edges.png`` (:func:`plot_edge_demo`) into ``out``; returns ``{"edges": path}``."""
    return _write({"edges": plot_edge_demo(image)}, out)


# --------------------------------------------------------------------------- runs

class RunArtifacts(dict):
    """What :func:`restore_run` returns: keys model, variables, config, source, step."""


def restore_run(workdir: str | os.PathLike) -> RunArtifacts:
    """The newest checkpoint of a training run: model, ``{"params": ...}``, config, source.

    Uses the config stored beside the checkpoint, so only the workdir is needed.
    """
    from cnnjax.train.loop import restore_run as restore

    run = restore(os.fspath(workdir))
    return RunArtifacts(model=run.model, variables={"params": run.state.params},
                        config=run.config, source=run.source, step=run.step,
                        input_shape=run.input_shape)


def _preprocess(run: Mapping, images):
    from cnnjax.data import augment

    info = run["source"].info
    return augment.preprocess(images, None, train=False, config=run["config"].augment,
                              mean=info.mean, std=info.std)


def predict(run: Mapping, split: str = "test", batch_size: int = 256):
    """``(images uint8, labels, probabilities)`` of a restored run on a whole split."""
    import jax

    model, variables = run["model"], run["variables"]
    forward = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x, train=False)))
    images, labels, probs = [], [], []
    for batch in run["source"].eval_batches(batch_size, split=split):
        mask = batch["mask"]
        p = np.asarray(forward(_preprocess(run, batch["image"])))
        images.append(batch["image"][mask])
        labels.append(batch["label"][mask])
        probs.append(p[mask])
    return np.concatenate(images), np.concatenate(labels), np.concatenate(probs)


def load_image(path: str | os.PathLike, image_shape: Sequence[int]) -> np.ndarray:
    """An image file as uint8 (H, W, C) at ``image_shape`` (resized, channels converted)."""
    from PIL import Image

    from cnnjax.data.base import convert_channels, fit_image

    with Image.open(os.fspath(path)) as im:
        array = np.asarray(im.convert("RGB"))
    return convert_channels(fit_image(array, tuple(image_shape[:2])), int(image_shape[2]))


def _write(figures: Mapping[str, Figure], out) -> dict[str, str]:
    paths = {}
    for name, fig in figures.items():
        paths[name] = save(fig, os.path.join(os.fspath(out), f"{name}.png"))
    return paths


def _filters_of(model, variables) -> Figure:
    name, kernel = first_conv_kernel(variables, model)
    return plot_filters(kernel, title=f"{name} filters")


def visualize_run(workdir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                  image: str | os.PathLike | None = None, index: int = 0,
                  worst: int = 10) -> dict[str, str]:
    """Every picture of a trained run, written as PNGs into ``out`` (default WORKDIR/viz).

    Files: ``architecture``, ``filters`` (first conv layer), ``feature_maps_<layer>``
    for each conv layer of one input (the file ``image``, else test example
    ``index``), ``training_curves``, ``confusion_matrix``, ``worst_examples``.
    Returns ``{name: path}``.
    """
    import jax.numpy as jnp

    from cnnjax.models import activations

    workdir = os.fspath(workdir)
    out = os.path.join(workdir, "viz") if out is None else os.fspath(out)
    run = restore_run(workdir)
    model, variables, source = run["model"], run["variables"], run["source"]
    names = source.info.class_names
    figures: dict[str, Figure] = {}
    figures["architecture"] = plot_architecture(model, run["input_shape"])
    figures["filters"] = _filters_of(model, variables)
    images, labels, probs = predict(run)
    if image is not None:
        raw = load_image(image, source.info.image_shape)[None]
        caption = os.path.basename(os.fspath(image))
    else:
        if not 0 <= index < len(images):
            raise ValueError(f"index={index} is out of range; the test split has "
                             f"{len(images)} images (0..{len(images) - 1}).")
        raw = images[index:index + 1]
        caption = f"test image {index} (label {labels[index]})"
    x = _preprocess(run, jnp.asarray(raw))
    acts = activations(model, variables, x, train=False)
    for layer in _conv_layer_names(model, acts):
        fig = plot_feature_maps(layer, acts[layer], image=np.asarray(x[0]))
        fig.suptitle(f"{fig.get_suptitle()} for {caption}", fontsize=11)
        figures[f"feature_maps_{layer}"] = fig
    figures["training_curves"] = plot_training_curves(
        workdir, title=f"training curves: {run['config'].get('name', '') or model.name}")
    figures["confusion_matrix"] = plot_confusion_matrix(labels, probs.argmax(-1),
                                                        class_names=names)
    figures["worst_examples"] = plot_worst_examples(images, labels, probs, count=worst,
                                                    class_names=names)
    return _write(figures, out)


def visualize_model(name: str, out: str | os.PathLike = "viz", *, seed: int = 0,
                    **model_kwargs) -> dict[str, str]:
    """Shapes-only pictures of an untrained registered model: architecture and filters.

    The architecture comes from ``jax.eval_shape``; the filters are the first conv
    layer's freshly initialized weights (that one layer is initialized alone, on
    a small input, so VGG-16's 138M parameters are never allocated).
    Returns ``{name: path}`` for ``architecture.png`` and ``filters.png``.
    """
    import jax
    import jax.numpy as jnp

    from cnnjax import models

    model = models.get(name, **model_kwargs)
    figures = {"architecture": plot_architecture(model)}
    first = next((spec for spec in getattr(model, "layers", lambda: ())()
                  if spec.option("kernel_size") is not None), None)
    if first is not None:
        h, w, c = model.input_shape
        size = min(h, w, 64)
        layer_vars = first.unbound().init(jax.random.key(seed), jnp.zeros((1, size, size, c)))
        variables = {"params": {first.name: layer_vars["params"]}}
    else:
        variables = model.init(jax.random.key(seed), jnp.zeros((1, *model.input_shape)))
    figures["filters"] = _filters_of(model, variables)
    figures["filters"].suptitle(f"{name} (untrained): {figures['filters'].get_suptitle()}",
                                fontsize=10)
    return _write(figures, out)
