"""Evaluation and prediction behind ``nbalex eval`` and ``nbalex predict``.

A checkpoint written by ``nbalex train`` holds everything they need: the network's
configuration and parameters, and in its ``extra`` the class names and the training set's
mean image (subtracted from every image evaluated or predicted, as in training).
"""

import numpy as np

from nbalex import runtime


class NonFiniteOutputs(ValueError):
    """The network's outputs were NaN or infinite for some images (a diverged network)."""


class Scores:
    """Running top-1/top-5 error and cross-entropy over batches of class probabilities.

    A row holding NaN or inf counts as wrong at top-1 and top-5 and is counted in
    ``nonfinite``: a diverged network must never look accurate.
    """

    def __init__(self):
        self.images = 0
        self.loss_sum = 0.0
        self.top1_wrong = 0
        self.top5_wrong = 0
        self.nonfinite = 0

    def add(self, probs, labels):
        """Count a batch: ``probs`` (N, K) rows summing to 1, ``labels`` (N,) ints."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        rows = np.arange(len(labels))
        picked = probs[rows, labels]
        bad = ~np.isfinite(probs).all(axis=1)
        self.loss_sum += float(-np.log(np.maximum(picked, 1e-30)).sum())
        # rank = how many other classes score at least as high as the true one (a tie is an
        # error: a network whose outputs are all equal must not look perfect)
        rank = (probs >= picked[:, None]).sum(axis=1) - 1
        self.top1_wrong += int(((rank >= 1) | bad).sum())
        self.top5_wrong += int(((rank >= 5) | bad).sum())
        self.nonfinite += int(bad.sum())
        self.images += len(labels)

    def reduced(self, world):
        """These counts summed over ``world``'s ranks (a collective; rank order, so every rank
        gets the same bits): each rank scored its share of the data."""
        total = world.sum([self.images, self.loss_sum, self.top1_wrong, self.top5_wrong,
                           self.nonfinite])
        out = Scores()
        out.images, out.top1_wrong, out.top5_wrong, out.nonfinite = (
            int(v) for v in total[[0, 2, 3, 4]])
        out.loss_sum = float(total[1])
        return out

    def result(self):
        """The scores; NonFiniteOutputs when any image's outputs were NaN or infinite."""
        if self.nonfinite:
            raise NonFiniteOutputs(f"the network's outputs are NaN or infinite for "
                                   f"{self.nonfinite} of {self.images} images")
        n = max(self.images, 1)
        return {"top1_error": self.top1_wrong / n, "top5_error": self.top5_wrong / n,
                "loss": self.loss_sum / n, "images": self.images}


def softmax(logits):
    """Row-wise softmax in float64 (N, K) -> (N, K)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(net, loader, ten_crop=False, should_stop=None, progress=False, desc="eval",
             world=None):
    """Top-1/top-5 error and mean loss of ``net`` over one pass of ``loader``.

    With ``ten_crop`` the loader yields 10 views per image (rows i*10 .. i*10+9 belong to
    image i) and the softmax is averaged over them.  ``should_stop()`` is polled after every
    batch; when it says yes the pass is abandoned and ``None`` is returned.

    ``world`` of several ranks: each rank's ``loader`` holds its share of the data (a
    ``shard``); the counts are summed over ranks once at the end, so every rank returns the
    same scores, and ``None`` on every rank when any rank was asked to stop.
    """
    scores = _score(net, loader, ten_crop, should_stop, progress, desc)
    if world is not None and world.size > 1:
        if world.any_flag(scores is None):
            return None
        scores = scores.reduced(world)
    return None if scores is None else scores.result()


def _score(net, loader, ten_crop, should_stop, progress, desc):
    scores = Scores()
    with runtime.progress_bar(progress, getattr(loader, "batches_per_epoch", None), desc, unit="batch") as bar:
        for x, labels in loader.epoch(0):
            probs = softmax(runtime.to_host(net.forward(x, train=False)))
            labels = runtime.to_host(labels)
            if ten_crop:
                probs = probs.reshape(len(labels), 10, -1).mean(axis=1)
            scores.add(probs, labels)
            bar.update(1)
            if should_stop is not None and should_stop():
                return None
    return scores


def load_checkpoint(path, backend="auto", batch_size=1, gpus=(0,)):
    """(net, state): the network saved in checkpoint ``path`` with its parameters loaded."""
    from nbalex import checkpoint
    state = checkpoint.load(path)
    net = runtime.build_net(state["config_text"], backend, batch_size, gpus, int(state.get("seed", 0)))
    net.load_params(state["params"])
    return net, state


def evaluate_checkpoint(checkpoint_path, data, *, ten_crop=False, batch_size=128,
                        backend="auto", gpus=(0,), workers=2, progress=True):
    """Top-1/top-5 error and loss of a checkpoint on packed ``data`` (centre crop or 10 crops).

    Returns {"top1_error", "top5_error", "loss", "images"}.
    """
    from nbalex.backends import resolve
    from nbalex.io.dataset import H5Dataset
    from nbalex.io.loader import Loader
    backend = resolve(backend)
    views = 10 if ten_crop else 1
    net, state = load_checkpoint(checkpoint_path, backend, batch_size * views, gpus)
    classes = (state.get("extra") or {}).get("classes")
    with H5Dataset(data) as dataset:
        runtime.check_data(net, dataset, data, classes=_extra_list(classes))
    with Loader(data, batch_size, net.input_size, backend=backend, train=False, seed=0,
                workers=workers, tower=runtime.loader_tower(net), view="ten" if ten_crop else "center",
                drop_last=False, mean=_training_mean(state)) as loader:
        return evaluate(net, loader, ten_crop=ten_crop, progress=progress)


def _training_mean(state):
    """The training set's mean image stored in a checkpoint, or None (the file's own mean)."""
    mean = (state.get("extra") or {}).get("mean")
    return None if mean is None else np.asarray(mean, np.float32)


def predict(checkpoint_path, images, *, top=5, backend="auto", batch_size=16, notes=None):
    """Class probabilities of image files, prepared as the packer and centre crop do.

    ``images``: files and folders; a folder stands for every image file under it (recursively,
    sorted: :func:`nbalex.io.image.image_files`).  Needs only the checkpoint: its ``extra``
    holds the class names and the training mean.  Returns one dict per image, in order:
    {"image", "top": [{"class", "index", "probability"}, ...]} for an image that was read,
    {"image", "error": one line} for one that could not be.  Remarks on images that were
    read (such as a decompression-bomb size) are appended to the list ``notes`` if given.
    """
    from nbalex.io.image import image_files, load_and_resize
    images = image_files(images)
    if not images:
        raise ValueError("no images to predict")
    batch_size = max(1, min(batch_size, len(images)))
    net, state = load_checkpoint(checkpoint_path, backend, batch_size)
    extra = state.get("extra") or {}
    if "classes" not in extra or "mean" not in extra:
        raise ValueError(f"{checkpoint_path} has no class list or mean image "
                         f"(it was not written by `nbalex train`)")
    classes = _extra_list(extra["classes"])
    mean = np.asarray(extra["mean"], dtype=np.float32)
    size, crop = mean.shape[0], net.input_size
    top = max(1, min(top, len(classes)))
    results, pending = [None] * len(images), []

    def run(batch):
        probs = softmax(runtime.to_host(net.forward(np.stack([x for _, x in batch]), train=False)))
        for (i, _), row in zip(batch, probs):
            best = np.argsort(-row, kind="stable")[:top]
            results[i] = {"image": images[i], "top": [
                {"class": classes[k], "index": int(k), "probability": float(row[k])}
                for k in best]}

    for i, path in enumerate(images):
        try:
            image = load_and_resize(path, size, notes)
        except MemoryError:
            raise
        except Exception as exc:  # unreadable: named in its place, the others still answered
            results[i] = {"image": path, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            continue
        pending.append((i, _centre_crop_input(image, mean, crop)))
        if len(pending) == batch_size:
            run(pending)
            pending = []
    if pending:
        run(pending)
    return results


def _centre_crop_input(image, mean, crop):
    """uint8 (S,S,3) image -> float32 (3,crop,crop) centre crop with the mean's crop removed."""
    image = np.asarray(image)
    if image.shape != mean.shape:
        raise ValueError(f"resized image has shape {image.shape}, the mean image {mean.shape}")
    y = (image.shape[0] - crop) // 2
    x = (image.shape[1] - crop) // 2
    window = (slice(y, y + crop), slice(x, x + crop))
    centred = image[window].astype(np.float32) - mean[window]
    return np.ascontiguousarray(centred.transpose(2, 0, 1))


def _extra_list(value):
    """A list of strings stored in a checkpoint's ``extra`` (None stays None)."""
    if value is None:
        return None
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value]
