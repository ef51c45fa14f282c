"""The HALS classifier: a small head on frozen cell features, trained online on the annotator's labels.

HALS (van der Wal et al., npj Digital Medicine 2021) trains, on top of frozen CNN features of each
nucleus (:mod:`colabel.services.hals.features`), a head of two fully connected layers of 32 ReLU units
and an output layer, with SGD (momentum 0.9), a stratified 75 / 25 train / validation split, minority
classes oversampled in the training split and early stopping after 10 epochs without validation
improvement. It retrains while the annotator labels, and suggests classes once every class has 10 labels.

Following Segebarth et al. (eLife 2020), results are made reliable with an :class:`Ensemble` of heads
trained from different seeds (each with its own split); the spread of the ensemble gives the uncertainty
used to rank suggestions and the members' penultimate activations, concatenated (:meth:`Ensemble.embed`),
feed Coreset active learning.

Speed: the members of an ensemble are trained **together**, as one batched network (``torch.bmm`` over a
leading member axis), so an ensemble of 5 costs about as much as one head trained on 5x the rows. With
the defaults (full-batch SGD, lr 0.1, at most 60 epochs, patience 10, one torch thread) a retrain of 5
members on 200 labels of 1280-d features takes a median of 50-60 ms, p95 ~60-65 ms (real IHC features:
~18 epochs, at most ~30; synthetic: ~20), and ~140 ms when all members run to the 60-epoch cap, on a
2-core CPU shared with other jobs; :func:`bench_retrain` measures it. Cost grows about linearly with the
labels (500: ~160 ms, 1000: ~0.6 s). One thread is the default because these
matrices are tiny: a second thread did not help when idle and turned a 79 ms p95 into seconds when the
cores were busy (OpenMP threads waiting on each other).

Thread safety: nothing here starts threads. :meth:`OnlineClassifier.retrain` trains a new
:class:`Ensemble` and then swaps it in with a single attribute assignment, so :meth:`OnlineClassifier.suggest`
may run concurrently from another thread and sees either the old or the new model, never a mix. Labels are
guarded by a lock, so labelling can continue during a retrain (those labels count towards the next one).

torch is imported only inside the training functions; inference uses numpy. No ray or hypha_rpc here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from colabel.errors import ColabelError, InvalidInputError

__all__ = [
    "HIDDEN_UNITS",
    "MAX_CLASSES",
    "MAX_SEED",
    "Head",
    "Ensemble",
    "OnlineClassifier",
    "Suggestion",
    "TrainReport",
    "NotReadyError",
    "train_head",
    "bench_retrain",
]

#: Units of each of the two hidden layers (HALS).
HIDDEN_UNITS = 32

#: Largest ``n_classes``: the output layer, the per-class splits and the class counts grow with it, so one
#: absurd number (``10**12``) must not allocate terabytes.
MAX_CLASSES = 1000

#: Largest seed (of a member): seeds feed numpy (non-negative) and torch (``seed * 7919 + ...`` must fit in
#: 64 bits); ``2**48 - 1`` leaves room for ``seed + member`` and :class:`OnlineClassifier`'s
#: ``seed + 1000 * version``.
MAX_SEED = 2**48 - 1

#: Training defaults (see :func:`train_head`), chosen so that a 5-member ensemble retrains on 200 labels
#: of 1280-d features well inside 200 ms on 2 CPU cores (see :func:`bench_retrain`).
DEFAULTS: dict[str, Any] = {
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "max_epochs": 60,
    "patience": 10,
    "min_delta": 1e-3,
    "batch_size": None,  # full batch
    "val_fraction": 0.25,
    "num_threads": 1,
    "column_weights": None,  # (D,) multipliers after standardisation; None: all 1
}


class NotReadyError(ColabelError):
    """Suggestions asked for before the classifier was trained, or while a class has fewer than the minimum
    labels per class."""


# ------------------------------------------------------------------------------------------- inputs


def _one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (a remote caller reads an error's last line only)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_n_classes(n_classes: Any) -> int:
    """``n_classes`` as an int in ``2 .. MAX_CLASSES`` (else :class:`InvalidInputError`)."""
    if isinstance(n_classes, (bool, np.bool_)) or not isinstance(n_classes, (int, np.integer)):
        raise InvalidInputError(f"n_classes must be an integer, got {n_classes!r}")
    if n_classes < 2:
        raise InvalidInputError(f"a classifier needs at least 2 classes, got n_classes={n_classes}")
    if n_classes > MAX_CLASSES:
        raise InvalidInputError(f"n_classes must be at most {MAX_CLASSES}, got {n_classes}")
    return int(n_classes)


def _check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``0 .. MAX_SEED`` (else :class:`InvalidInputError`)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an integer, got {repr(seed)[:80]}")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"{name} must lie in 0..{MAX_SEED} (2**48 - 1), got {seed}")
    return int(seed)


def _check_features(features: ArrayLike, *, dim: int | None = None, name: str = "features") -> np.ndarray:
    """``features`` as a finite ``(N, D)`` float32 array (no copy when it is one already); ``dim``: required D."""
    try:
        x = np.asarray(features, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"{name} must be a numeric (N, D) array: {_one_line(exc)}") from None
    if x.ndim != 2:
        raise InvalidInputError(f"{name} must have shape (N, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise InvalidInputError(f"{name} must have {dim} columns (the training dimension), got {x.shape[1]}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise InvalidInputError(f"{name} contain NaN or inf in {len(bad)} row(s), first at row {int(bad[0])}")
    return x


def _check_labels(labels: ArrayLike, n: int, n_classes: int, *, min_per_class: int = 2) -> np.ndarray:
    """``labels`` as ``(n,)`` int64 class indices in ``0 .. n_classes - 1``, every class ``min_per_class`` times."""
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"labels must be a vector (N,) of class indices: {_one_line(exc)}") from None
    if y.ndim != 1:
        raise InvalidInputError(f"labels must have shape (N,), got shape {y.shape}")
    if len(y) != n:
        raise InvalidInputError(f"labels and features disagree: {len(y)} labels for {n} feature rows")
    if y.size and not (np.issubdtype(y.dtype, np.integer) or
                       (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(np.mod(y, 1) == 0))):
        raise InvalidInputError(f"labels must be integer class indices, got dtype {y.dtype}")
    out = (y < 0) | (y >= n_classes)  # before the cast: 1e30 must not wrap around to a valid class
    if out.any():
        raise InvalidInputError(
            f"labels must lie in 0..{n_classes - 1} (n_classes={n_classes}), found {y[out][0].item():g}"
        )
    y = y.astype(np.int64)
    counts = np.bincount(y, minlength=n_classes)
    few = np.flatnonzero(counts < min_per_class)
    if few.size:
        raise InvalidInputError(
            f"every class needs at least {min_per_class} labels to train and validate; "
            + ", ".join(f"class {c} has {counts[c]}" for c in few[:5])
        )
    return y


# ------------------------------------------------------------------------------------------- splits


def _stratified_split(y: np.ndarray, n_classes: int, rng: np.random.Generator, val_fraction: float):
    """Per class: ``round(val_fraction * n_c)`` (at least 1, at most ``n_c - 1``) to validation."""
    train, val = [], []
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(max(1, int(round(val_fraction * len(idx)))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return train, val


def _oversample(train: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Every class repeated up to the largest class's count (whole copies, then a random remainder)."""
    target = max(len(t) for t in train)
    parts = []
    for idx in train:
        reps, rest = divmod(target, len(idx))
        parts.append(np.concatenate([np.tile(idx, reps), rng.choice(idx, size=rest, replace=False)]))
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------- heads


@dataclass(eq=False)
class Head:
    """One trained HALS head: ``D -> 32 -> 32 -> n_classes`` (ReLU), with its input standardisation.

    Weights are numpy float32 (inference needs no torch): ``w1 (D, 32)``, ``b1 (32,)``, ``w2 (32, 32)``,
    ``b2 (32,)``, ``w3 (32, C)``, ``b3 (C,)``; ``mean`` / ``std`` ``(D,)`` are the training split's feature
    statistics (``std`` is 1 for features constant over the split; with ``column_weights`` w, ``std / w``,
    which weights the standardised column by w). The weights are those of the epoch
    with the lowest validation loss (early stopping keeps the best weights).

    Attributes
    ----------
    val_accuracy : float
        Accuracy on the held-out 25 % at the best epoch.
    val_loss : float
        Class-balanced cross-entropy on the held-out split at the best epoch.
    best_epoch, epochs : int
        The best epoch (1-based) and the number of epochs run.
    stopped_early : bool
        Whether training stopped on patience before ``max_epochs``.
    """

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n_classes: int
    seed: int
    val_accuracy: float
    val_loss: float
    best_epoch: int
    epochs: int
    stopped_early: bool
    n_train: int = 0
    n_val: int = 0

    @property
    def dim(self) -> int:
        return int(self.w1.shape[0])

    def _folded(self) -> tuple[np.ndarray, np.ndarray]:
        """First layer with the standardisation folded in: ``((x - m) / s) @ w1 + b1 = x @ w1' + b1'``."""
        w = self.w1 / self.std[:, None]
        b = self.b1 - (self.mean / self.std) @ self.w1
        return w.astype(np.float32), b.astype(np.float32)

    def embed(self, features: ArrayLike) -> np.ndarray:
        """Penultimate (second hidden layer, post-ReLU) activations, ``(N, 32)`` float32."""
        x = _check_features(features, dim=self.dim)
        w, b = self._folded()
        h = np.maximum(x @ w + b, 0)
        return np.maximum(h @ self.w2 + self.b2, 0)

    def logits(self, features: ArrayLike) -> np.ndarray:
        return self.embed(features) @ self.w3 + self.b3

    def predict_proba(self, features: ArrayLike) -> np.ndarray:
        """Softmax probabilities, ``(N, n_classes)`` float32."""
        return _softmax(self.logits(features))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use *n* torch intra-op threads inside the block, then restore (None: leave as is).

    With torch's OpenMP backend the setting belongs to the calling thread, so a retrain in a worker
    thread does not change the thread count of feature extraction running elsewhere.
    """
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_members(x: np.ndarray, y: np.ndarray, n_classes: int, seeds: Sequence[int], *,
                 num_threads: int | None = 1, **kw: Any) -> list[Head]:
    """Train one head per seed, all at once as a batched network. Inputs are already validated."""
    with _torch_threads(num_threads):
        return _fit_members_batched(x, y, n_classes, seeds, **kw)


def _fit_members_batched(x: np.ndarray, y: np.ndarray, n_classes: int, seeds: Sequence[int], *, lr: float,
                         momentum: float, weight_decay: float, max_epochs: int, patience: int, min_delta: float,
                         batch_size: int | None, val_fraction: float,
                         column_weights: np.ndarray | None = None) -> list[Head]:
    import torch
    import torch.nn.functional as F

    m, d, h, c = len(seeds), x.shape[1], HIDDEN_UNITS, n_classes
    rng = np.random.default_rng([int(s) for s in seeds])
    train_sets, val_sets, uniques = [], [], []
    for s in seeds:
        member_rng = np.random.default_rng(int(s))
        train, val = _stratified_split(y, c, member_rng, val_fraction)
        uniques.append(np.concatenate(train))
        train_sets.append(_oversample(train, member_rng))
        val_sets.append(np.concatenate(val))
    # The split sizes depend only on the class counts, so every member has the same sizes.
    xt = torch.from_numpy(x if x.flags.writeable else x.copy())  # torch wants a writable array
    yt = torch.from_numpy(y)
    mean = torch.from_numpy(np.stack([x[u].mean(axis=0) for u in uniques]))  # (M, D)
    std = np.stack([x[u].std(axis=0) for u in uniques])
    # A feature constant over the training split keeps scale 1 (as scikit-learn's StandardScaler): dividing
    # by a tiny std would blow up the rare test cell where it is not constant.
    std = np.where(std < 1e-6, 1.0, std)
    if column_weights is not None:
        # Weighting a standardised column by w is standardising it with std / w: the Head keeps its format.
        std = std / _check_column_weights(column_weights, d)[None, :]
    std = torch.from_numpy(std.astype(np.float32))
    va_idx = torch.from_numpy(np.stack(val_sets))  # (M, V)
    x_val = (xt[va_idx] - mean[:, None]) / std[:, None]  # (M, V, D), standardised once
    y_val = yt[va_idx]
    # Class-balanced validation loss: each class weighs 1 / C whatever its count.
    val_counts = torch.bincount(y_val[0], minlength=c).float()
    val_weight = (1.0 / (c * val_counts))[y_val]  # (M, V)
    if batch_size is None or int(batch_size) >= len(train_sets[0]):
        # Full batch: oversampling is exactly a per-row weight (its multiplicity), so train on the
        # unique rows with weights instead of repeating rows.
        tr_idx = torch.from_numpy(np.stack([np.sort(u) for u in uniques]))  # (M, T)
        mult = np.stack([np.bincount(o, minlength=len(x))[np.sort(u)]
                         for o, u in zip(train_sets, uniques, strict=True)])
        tr_weight = torch.from_numpy(mult / mult.sum(axis=1, keepdims=True)).float()  # (M, T), rows sum to 1
        bsz = None
    else:
        tr_idx = torch.from_numpy(np.stack(train_sets))  # (M, T) with oversampled repeats
        tr_weight = torch.full(tr_idx.shape, 1.0 / tr_idx.shape[1])
        bsz = int(batch_size)
    x_tr = (xt[tr_idx] - mean[:, None]) / std[:, None]  # (M, T, D), standardised once
    y_tr = yt[tr_idx]
    t_len = tr_idx.shape[1]

    def init(fan_in: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        bound = 1.0 / np.sqrt(fan_in)  # torch.nn.Linear's default initialisation
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound

    layers = []
    for fan_in, fan_out in ((d, h), (h, h), (h, c)):
        ws, bs = [], []
        for s in seeds:
            gen = torch.Generator().manual_seed(int(s) * 7919 + fan_in * 31 + fan_out)
            ws.append(init(fan_in, (fan_in, fan_out), gen))
            bs.append(init(fan_in, (1, fan_out), gen))
        layers += [torch.stack(ws).requires_grad_(), torch.stack(bs).requires_grad_()]
    w1, b1, w2, b2, w3, b3 = layers
    opt = torch.optim.SGD(layers, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def forward(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.relu(torch.baddbmm(b1, xb, w1))
        a = torch.relu(torch.baddbmm(b2, a, w2))
        return torch.baddbmm(b3, a, w3), a

    best = [p.detach().clone() for p in layers]
    best_loss = torch.full((m,), float("inf"))
    best_acc = torch.zeros(m)
    best_epoch = torch.zeros(m, dtype=torch.long)
    wait = torch.zeros(m, dtype=torch.long)
    active = torch.ones(m, dtype=torch.bool)
    stop_epoch = torch.zeros(m, dtype=torch.long)  # epoch at which patience ran out (0: never)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    epoch = 0
    for epoch in range(1, max_epochs + 1):  # noqa: B007 - used after the loop
        if bsz is None:
            batches = [(x_tr, y_tr, tr_weight)]
        else:
            order = torch.argsort(torch.rand(m, t_len, generator=gen), dim=1)
            batches = []
            for start in range(0, t_len, bsz):
                sel = order[:, start:start + bsz]
                batches.append((x_tr.gather(1, sel[:, :, None].expand(-1, -1, d)), y_tr.gather(1, sel),
                                torch.full(sel.shape, 1.0 / sel.shape[1])))
        for xb, yb, wb in batches:
            logits, _ = forward(xb)
            ce = F.cross_entropy(logits.reshape(-1, c), yb.reshape(-1), reduction="none").view(m, -1)
            # Sum of the members' own (weighted mean) losses: each member gets exactly its own gradient.
            loss = (ce * wb).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits, _ = forward(x_val)
            ce = F.cross_entropy(logits.reshape(-1, c), y_val.reshape(-1), reduction="none").view(m, -1)
            val_loss = (ce * val_weight).sum(dim=1)
            val_acc = (logits.argmax(dim=2) == y_val).float().mean(dim=1)
            improved = active & (val_loss < best_loss - min_delta)
            if improved.any():
                for kept, p in zip(best, layers, strict=True):
                    kept[improved] = p.detach()[improved]
                best_loss = torch.where(improved, val_loss, best_loss)
                best_acc = torch.where(improved, val_acc, best_acc)
                best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
            wait = torch.where(improved, torch.zeros_like(wait), wait + 1)
            stopping = active & (wait >= patience)
            stop_epoch = torch.where(stopping, torch.full_like(stop_epoch, epoch), stop_epoch)
            active &= ~stopping
        if not active.any():
            break

    heads = []
    arrays = [p.numpy() for p in best]
    mean_np, std_np = mean.numpy(), std.numpy()
    for k, s in enumerate(seeds):
        early = bool(stop_epoch[k] > 0)
        heads.append(Head(
            w1=arrays[0][k].copy(), b1=arrays[1][k, 0].copy(), w2=arrays[2][k].copy(), b2=arrays[3][k, 0].copy(),
            w3=arrays[4][k].copy(), b3=arrays[5][k, 0].copy(), mean=mean_np[k].copy(), std=std_np[k].copy(),
            n_classes=c, seed=int(s), val_accuracy=float(best_acc[k]), val_loss=float(best_loss[k]),
            best_epoch=int(best_epoch[k]), epochs=int(stop_epoch[k]) if early else epoch, stopped_early=early,
            n_train=int(len(uniques[k])), n_val=int(va_idx.shape[1]),
        ))
    return heads


def _check_column_weights(weights: ArrayLike, dim: int) -> np.ndarray:
    """*weights* as a ``(dim,)`` float64 array of positive finite numbers (else a clear error)."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"column_weights must be numbers: {exc}") from None
    if w.shape != (dim,):
        raise InvalidInputError(f"column_weights must have shape ({dim},) (one per feature column), got {w.shape}")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise InvalidInputError("column_weights must be finite and > 0")
    return w


def _train_kwargs(overrides: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise InvalidInputError(f"unknown training options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    # None means "default" except where None is itself a setting (full batch, torch's thread count).
    kw = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None or k in ("batch_size", "num_threads")}}
    if not kw["lr"] > 0:
        raise InvalidInputError(f"lr must be > 0, got {kw['lr']}")
    if int(kw["max_epochs"]) < 1 or int(kw["patience"]) < 1:
        raise InvalidInputError("max_epochs and patience must be >= 1")
    if not 0 < kw["val_fraction"] < 1:
        raise InvalidInputError(f"val_fraction must lie in (0, 1), got {kw['val_fraction']}")
    if kw["num_threads"] is not None and int(kw["num_threads"]) < 1:
        raise InvalidInputError(f"num_threads must be >= 1 or None, got {kw['num_threads']}")
    if kw["batch_size"] is not None and int(kw["batch_size"]) < 1:
        raise InvalidInputError(f"batch_size must be >= 1 or None (full batch), got {kw['batch_size']}")
    kw["max_epochs"], kw["patience"] = int(kw["max_epochs"]), int(kw["patience"])
    return kw


def train_head(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    n_classes: int,
    seed: int = 0,
    lr: float | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    **options: Any,
) -> Head:
    """Train one HALS head (CPU, small).

    Parameters
    ----------
    features : array-like, shape (N, D), float
        Frozen backbone features of the labelled cells. Standardised inside with the training split's
        mean / std (stored in the :class:`Head`).
    labels : array-like, shape (N,), int
        Class indices in ``0 .. n_classes - 1``; every class needs at least 2 labels (one to train,
        one to validate).
    n_classes : int
        ``2 .. MAX_CLASSES`` (1000).
    seed : int
        ``0 .. MAX_SEED`` (``2**48 - 1``). Seeds the split, the oversampling, the initialisation and the batch
        order.
    lr : float
        SGD learning rate (momentum 0.9, weight decay 1e-4); default 0.1.
    max_epochs : int
        Epoch cap (default 60, which bounds a 5-member retrain on 200 labels to ~150 ms); training
        usually stops earlier, 10 epochs (``patience``) after the class-balanced validation
        cross-entropy last improved by more than ``min_delta`` (1e-3).
    batch_size : int, optional
        Mini-batch size; ``None`` (default) is full-batch gradient descent, which is what keeps a
        retrain within the interactive budget (mini-batches of 32 are ~4x slower and no more accurate
        on these small label sets).
    **options
        ``momentum``, ``weight_decay``, ``patience``, ``min_delta``, ``val_fraction`` (default 0.25),
        ``num_threads`` (torch threads while training, default 1; ``None`` leaves torch's setting),
        ``column_weights`` (``(D,)`` positive multipliers of the standardised columns, e.g.
        :func:`colabel.services.hals.measurements.column_weights` to balance 12 nucleus measurements
        against 1280 CNN columns; default all 1).

    Returns
    -------
    Head

    Raises
    ------
    InvalidInputError
        Non-numeric or NaN / inf features, shape mismatches, labels out of range, fewer than 2 or more than
        :data:`MAX_CLASSES` classes, fewer than 2 labels in a class, a seed that is not an integer in
        ``0 .. MAX_SEED``.

    Notes
    -----
    Split: per class, ``round(0.25 * n_c)`` labels (at least one) are held out. Oversampling: in the
    training split every class is repeated up to the size of the largest one.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 1, (40, 8)), rng.normal(2, 1, (40, 8))].astype(np.float32)
    >>> head = train_head(x, np.repeat([0, 1], 40), n_classes=2)
    >>> head.val_accuracy > 0.8
    True
    """
    c = _check_n_classes(n_classes)
    x = _check_features(features)
    y = _check_labels(labels, len(x), c)
    seed = _check_seed(seed)
    kw = _train_kwargs({"lr": lr, "max_epochs": max_epochs, "batch_size": batch_size, **options})
    return _fit_members(x, y, c, [seed], **kw)[0]


# ------------------------------------------------------------------------------------------ ensemble


class Ensemble:
    """Heads trained from different seeds (each with its own split); predictions are the member mean.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 1, (40, 8)), rng.normal(2, 1, (40, 8))].astype(np.float32)
    >>> ens = Ensemble().fit(x, np.repeat([0, 1], 40), n_classes=2, n_members=3)
    >>> classes, confidence = ens.predict(x[:2])
    >>> ens.predict_proba(x).shape, ens.embed(x).shape, ens.uncertainty(x).shape
    ((80, 2), (80, 96), (80,))
    """

    def __init__(self) -> None:
        self.members: list[Head] = []
        self.n_classes = 0
        self.dim = 0
        self.seconds = 0.0
        self._stack: tuple[np.ndarray, ...] | None = None

    @property
    def fitted(self) -> bool:
        return bool(self.members)

    def fit(
        self,
        features: ArrayLike,
        labels: ArrayLike,
        *,
        n_classes: int,
        n_members: int = 5,
        seeds: Sequence[int] | None = None,
        seed: int = 0,
        **train_options: Any,
    ) -> Ensemble:
        """Train *n_members* heads (all at once, batched) and return self.

        Parameters
        ----------
        features, labels, n_classes
            As for :func:`train_head`.
        n_members : int
            Number of heads (ignored when *seeds* is given).
        seeds : sequence of int, optional
            One distinct seed per member, each in ``0 .. MAX_SEED``; default ``seed, seed + 1, ...``.
        seed : int
            Base seed when *seeds* is not given (``0 .. MAX_SEED``).
        **train_options
            ``lr``, ``max_epochs``, ``batch_size``, ``momentum``, ``weight_decay``, ``patience``,
            ``min_delta``, ``val_fraction`` (see :func:`train_head`).
        """
        c = _check_n_classes(n_classes)
        x = _check_features(features)
        y = _check_labels(labels, len(x), c)
        if seeds is None:
            if isinstance(n_members, bool) or not isinstance(n_members, (int, np.integer)) or n_members < 1:
                raise InvalidInputError(f"n_members must be a positive integer, got {n_members!r}")
            seeds = [_check_seed(seed) + i for i in range(int(n_members))]
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
            raise InvalidInputError(f"seeds must be a sequence of integers, got {repr(seeds)[:80]}")
        seeds = [_check_seed(s, "every seed") for s in seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise InvalidInputError(f"seeds must be distinct and non-empty, got {seeds}")
        kw = _train_kwargs(train_options)
        t0 = time.perf_counter()
        members = _fit_members(x, y, c, seeds, **kw)
        self.seconds = time.perf_counter() - t0
        self._set_members(members)
        return self

    @classmethod
    def from_members(cls, members: Sequence[Head]) -> Ensemble:
        """An ensemble of already trained heads (same dim and classes)."""
        if not members:
            raise InvalidInputError("an ensemble needs at least one head")
        if len({(h.dim, h.n_classes) for h in members}) != 1:
            raise InvalidInputError("heads of an ensemble must share feature dim and number of classes")
        ens = cls()
        ens._set_members(list(members))
        return ens

    def _set_members(self, members: list[Head]) -> None:
        folded = [h._folded() for h in members]
        w1 = np.concatenate([w for w, _ in folded], axis=1)  # (D, M * H): one matmul for all members
        b1 = np.concatenate([b for _, b in folded])
        stack = (w1, b1, np.stack([h.w2 for h in members]), np.stack([h.b2 for h in members])[:, None],
                 np.stack([h.w3 for h in members]), np.stack([h.b3 for h in members])[:, None])
        self.members, self.n_classes, self.dim = members, members[0].n_classes, members[0].dim
        self._stack = stack

    def _require(self) -> tuple[np.ndarray, ...]:
        if self._stack is None:
            raise NotReadyError("the ensemble is not trained yet: call fit() first")
        return self._stack

    def _member_embeddings(self, features: ArrayLike) -> np.ndarray:
        """``(M, N, 32)`` penultimate activations of every member."""
        w1, b1, w2, b2, _, _ = self._require()
        x = _check_features(features, dim=self.dim)
        a = np.maximum(x @ w1 + b1, 0)  # (N, M * H)
        a = a.reshape(len(x), len(self.members), HIDDEN_UNITS).transpose(1, 0, 2)  # (M, N, H)
        return np.maximum(np.matmul(a, w2) + b2, 0)

    def member_proba(self, features: ArrayLike) -> np.ndarray:
        """``(M, N, n_classes)`` probabilities of each member."""
        _, _, _, _, w3, b3 = self._require()
        return _softmax(np.matmul(self._member_embeddings(features), w3) + b3)

    def predict_proba(self, features: ArrayLike) -> np.ndarray:
        """``(N, n_classes)`` float32: the mean of the members' softmax probabilities."""
        return self.member_proba(features).mean(axis=0)

    def predict(self, features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """``(classes (N,) int64, confidence (N,) float32)``: the argmax of the mean probability and its value."""
        p = self.predict_proba(features)
        cls = p.argmax(axis=1)
        return cls.astype(np.int64), p[np.arange(len(p)), cls].astype(np.float32)

    def uncertainty(self, features: ArrayLike, *, kind: str = "entropy") -> np.ndarray:
        """Per-cell uncertainty, ``(N,)`` float32, in ``[0, 1]``.

        ``kind="entropy"`` (default): entropy of the ensemble-mean probability divided by ``log(C)``
        (total predictive uncertainty; 0 = all members certain of one class, 1 = uniform). Comparable
        across class counts.

        ``kind="disagreement"``: mutual information between prediction and member (BALD: entropy of the
        mean minus mean member entropy), divided by ``log(C)``; high only where members disagree
        (epistemic uncertainty), low for cells that are ambiguous to every member alike.
        """
        member = self.member_proba(features)
        mean = member.mean(axis=0)
        log_c = np.log(self.n_classes)
        total = _entropy(mean) / log_c
        if kind == "entropy":
            return np.clip(total, 0, 1).astype(np.float32)
        if kind == "disagreement":
            return np.clip(total - _entropy(member).mean(axis=0) / log_c, 0, 1).astype(np.float32)
        raise InvalidInputError(f"kind must be 'entropy' or 'disagreement', got {kind!r}")

    @property
    def validation_accuracy(self) -> float:
        """Mean of the members' held-out accuracies (each on its own 25 % split, at its best epoch)."""
        self._require()
        return float(np.mean([h.val_accuracy for h in self.members]))

    def embed(self, features: ArrayLike, *, how: str = "concat") -> np.ndarray:
        """Classifier features for Coreset (k-center greedy on classifier features).

        ``how="concat"`` (default): ``(N, 32 * M)`` float32, the members' penultimate activations side by side
        (member 0's 32 units first). Squared distances are the sum of the members' own squared distances, so
        they depend only on what each member computes: permuting a member's hidden units (the same network)
        changes no distance. This is what Coreset selects on (the live ``ClassifierService.predict`` and the
        simulation). ``"mean"``: ``(N, 32)``, the activations averaged over members; hidden units of
        independently trained members are not aligned, so the mean mixes unrelated units and its distances
        depend on their arbitrary order -- not for distances.
        """
        e = self._member_embeddings(features)
        if how == "mean":
            return e.mean(axis=0).astype(np.float32)
        if how == "concat":
            m, n, h = e.shape  # explicit sizes: -1 is ambiguous for 0 rows
            return np.ascontiguousarray(e.transpose(1, 0, 2).reshape(n, m * h), dtype=np.float32)
        raise InvalidInputError(f"how must be 'mean' or 'concat', got {how!r}")


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


# ------------------------------------------------------------------------------------ online policy


class Suggestion(NamedTuple):
    """A suggested class for one cell."""

    cls: int
    """Suggested class index."""
    confidence: float
    """Ensemble-mean probability of that class, in [0, 1]."""
    uncertainty: float
    """Normalised predictive entropy, in [0, 1] (see :meth:`Ensemble.uncertainty`)."""


@dataclass(frozen=True)
class TrainReport:
    """What one :meth:`OnlineClassifier.retrain` did."""

    n_labels: int
    seconds: float
    val_accuracy: float
    version: int
    class_counts: tuple[int, ...] = ()
    epochs: tuple[int, ...] = field(default=())


FeatureSource = Callable[[list[Hashable]], ArrayLike] | ArrayLike | Mapping[Hashable, ArrayLike]


def _lookup(source: FeatureSource | None, cell_ids: list[Hashable]) -> np.ndarray:
    """Features of *cell_ids* from a callable, an ``(n_cells, D)`` array indexed by int id, or a mapping."""
    if source is None:
        raise InvalidInputError("no features: pass features_by_cell (a callable, array or mapping)")
    if callable(source):
        x = source(list(cell_ids))
    elif isinstance(source, Mapping):
        try:
            x = np.stack([np.asarray(source[c], dtype=np.float32) for c in cell_ids]) if cell_ids else None
        except KeyError as exc:
            raise InvalidInputError(f"no features for cell {exc.args[0]!r}") from None
    else:
        table = np.asarray(source)
        try:
            ids = np.asarray(cell_ids, dtype=np.int64)
        except (TypeError, ValueError):
            raise InvalidInputError("features_by_cell is an array, so cell ids must be integer row indices") from None
        if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
            raise InvalidInputError(f"cell id out of range for a features array of {len(table)} rows")
        x = table[ids] if ids.size else None
    if x is None:
        return np.zeros((0, 0), np.float32)
    x = _check_features(x)
    if len(x) != len(cell_ids):
        raise InvalidInputError(f"features_by_cell returned {len(x)} rows for {len(cell_ids)} cells")
    return x


class OnlineClassifier:
    """The HALS labelling policy: collect labels, retrain when due, suggest classes once trained.

    * A retrain is due (:meth:`should_retrain`) once every class has ``min_labels_per_class`` labels
      -- immediately the first time this threshold is reached, then after every ``retrain_every`` label
      changes (a new cell, a changed class or a removed label) since the labels the last training used.
    * :meth:`retrain` trains a new :class:`Ensemble` of ``n_members`` heads on a snapshot of the labels and
      swaps it in atomically; it does not start threads (the service runs it in the background).
    * :attr:`ready` once trained while every class has ``min_labels_per_class`` labels; :meth:`suggest`
      returns ``(class, confidence, uncertainty)`` per cell. When relabels or removals take a class below the
      threshold, suggestions pause (:attr:`ready` is False) until it is reached again, and a retrain is then
      due at once (the model was trained on labels that no longer hold).

    Parameters
    ----------
    n_classes : int
        ``2 .. MAX_CLASSES`` (1000).
    features : callable, array or mapping, optional
        Where cell features come from: ``f(cell_ids) -> (n, D)``, an ``(n_cells, D)`` array indexed by
        integer cell id, or a ``{cell_id: (D,)}`` mapping. Can also be given to each call.
    min_labels_per_class : int
        HALS: 10.
    retrain_every : int
        HALS: 5.
    n_members : int
        Ensemble size (5).
    seed : int
        Base seed; retrain *v* uses seeds ``seed + 1000 * v + i``.
    **train_options
        Passed to :meth:`Ensemble.fit`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> table = np.r_[rng.normal(0, 1, (30, 8)), rng.normal(3, 1, (30, 8))].astype(np.float32)
    >>> clf = OnlineClassifier(2, features=table)
    >>> for cell in range(60):
    ...     clf.add_label(cell, int(cell >= 30))
    >>> clf.should_retrain(), clf.retrain().version, clf.suggest([0, 59])[1].cls
    (True, 1, 1)
    """

    def __init__(
        self,
        n_classes: int,
        *,
        features: FeatureSource | None = None,
        min_labels_per_class: int = 10,
        retrain_every: int = 5,
        n_members: int = 5,
        seed: int = 0,
        **train_options: Any,
    ):
        self.n_classes = _check_n_classes(n_classes)
        if min_labels_per_class < 2:
            raise InvalidInputError("min_labels_per_class must be >= 2 (one to train, one to validate)")
        if retrain_every < 1:
            raise InvalidInputError("retrain_every must be >= 1")
        if n_members < 1:
            raise InvalidInputError("n_members must be >= 1")
        self.features = features
        self.min_labels_per_class = int(min_labels_per_class)
        self.retrain_every = int(retrain_every)
        self.n_members = int(n_members)
        self.seed = _check_seed(seed)
        self.train_options = dict(_train_kwargs(train_options))
        self._labels: dict[Hashable, int] = {}
        self._lock = threading.Lock()  # guards the label set (held for microseconds)
        self._retrain_lock = threading.Lock()  # one retrain at a time; suggest() never waits for it
        self._changes = 0  # label changes ever made
        self._trained_changes: int | None = None  # self._changes at the snapshot of the last training
        self._counts = np.zeros(self.n_classes, dtype=np.int64)  # labels per class
        self._threshold_lost = False  # a class fell below the threshold after the last training's snapshot
        self._model: Ensemble | None = None
        self.version = 0
        self.last_report: TrainReport | None = None

    # labels ---------------------------------------------------------------------------------------

    def add_label(self, cell_id: Hashable, cls: int) -> None:
        """Set the class of *cell_id* (relabelling a cell counts as a change; the same label again does not)."""
        if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or not 0 <= cls < self.n_classes:
            raise InvalidInputError(f"class must be an integer in 0..{self.n_classes - 1}, got {cls!r}")
        if not isinstance(cell_id, Hashable):
            raise InvalidInputError(f"cell id must be hashable, got {type(cell_id).__name__}")
        with self._lock:
            before = self._labels.get(cell_id)
            if before != int(cls):
                if before is not None:
                    self._counts[before] -= 1
                self._counts[int(cls)] += 1
                self._labels[cell_id] = int(cls)
                self._changes += 1
                self._note_threshold()

    def remove_label(self, cell_id: Hashable) -> None:
        """Forget the label of *cell_id* (a change); unknown ids are ignored."""
        with self._lock:
            before = self._labels.pop(cell_id, None)
            if before is not None:
                self._counts[before] -= 1
                self._changes += 1
                self._note_threshold()

    def _note_threshold(self) -> None:
        """After a change (lock held): remember that a class went below the threshold."""
        if (self._counts < self.min_labels_per_class).any():
            self._threshold_lost = True

    @property
    def labels(self) -> dict[Hashable, int]:
        """A copy of the label set, cell id -> class."""
        with self._lock:
            return dict(self._labels)

    @property
    def n_labels(self) -> int:
        return len(self._labels)

    def class_counts(self) -> np.ndarray:
        """Labels per class, ``(n_classes,)`` int."""
        with self._lock:
            return self._counts.copy()

    @property
    def threshold_reached(self) -> bool:
        """Every class has at least ``min_labels_per_class`` labels."""
        return bool((self.class_counts() >= self.min_labels_per_class).all())

    @property
    def changes_since_training(self) -> int:
        """Label changes since the snapshot the current model was trained on (all changes if untrained)."""
        return self._changes - (self._trained_changes or 0)

    def should_retrain(self) -> bool:
        """True when the threshold is reached and either no model exists yet, a class fell below the threshold
        since the labels the current model was trained on, or ``retrain_every`` label changes have
        accumulated since then."""
        if not self.threshold_reached:
            return False
        if self._trained_changes is None or self._threshold_lost:
            return True
        return self._changes - self._trained_changes >= self.retrain_every

    # model ----------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Suggestions are allowed: a model has been trained and every class has ``min_labels_per_class``
        labels now (relabels or removals that take a class below pause suggestions)."""
        return self._model is not None and self.threshold_reached

    @property
    def model(self) -> Ensemble | None:
        return self._model

    def retrain(self, features_by_cell: FeatureSource | None = None) -> TrainReport:
        """Train a new ensemble on a snapshot of the labels and swap it in.

        Parameters
        ----------
        features_by_cell : callable, array or mapping, optional
            Default: the *features* given to the constructor (then remembered for :meth:`suggest`).

        Raises
        ------
        InvalidInputError
            Fewer than ``min_labels_per_class`` labels in some class, or bad features.
        """
        with self._retrain_lock:
            return self._retrain(features_by_cell)

    def _retrain(self, features_by_cell: FeatureSource | None) -> TrainReport:
        source = features_by_cell if features_by_cell is not None else self.features
        with self._lock:
            snapshot = dict(self._labels)
            changes = self._changes
            lost, self._threshold_lost = self._threshold_lost, False
        ids = list(snapshot)
        y = np.fromiter(snapshot.values(), dtype=np.int64, count=len(snapshot))
        counts = np.bincount(y, minlength=self.n_classes)
        try:
            if (counts < self.min_labels_per_class).any():
                few = [f"class {c} has {counts[c]}" for c in np.flatnonzero(counts < self.min_labels_per_class)]
                raise InvalidInputError(
                    f"retraining needs {self.min_labels_per_class} labels per class; " + ", ".join(few[:5])
                )
            t0 = time.perf_counter()
            x = _lookup(source, ids)
            version = self.version + 1
            seeds = [self.seed + 1000 * version + i for i in range(self.n_members)]
            model = Ensemble().fit(x, y, n_classes=self.n_classes, seeds=seeds, **self.train_options)
            seconds = time.perf_counter() - t0
        except BaseException:
            with self._lock:
                self._threshold_lost = self._threshold_lost or lost
            raise
        # Publish: one assignment each, so a concurrent suggest() sees the old or the new model.
        if features_by_cell is not None:
            self.features = features_by_cell
        self._model = model
        self._trained_changes = changes
        self.version = version
        self.last_report = TrainReport(
            n_labels=len(ids), seconds=seconds, val_accuracy=model.validation_accuracy, version=version,
            class_counts=tuple(int(v) for v in counts), epochs=tuple(h.epochs for h in model.members),
        )
        return self.last_report

    def suggest(self, cell_ids: Iterable[Hashable], features_by_cell: FeatureSource | None = None) -> list[Suggestion]:
        """``(class, confidence, uncertainty)`` for each cell, from the current model.

        Raises
        ------
        NotReadyError
            Before the first :meth:`retrain`, or while a class has fewer than ``min_labels_per_class`` labels.
        """
        model = self._model  # read once: a concurrent retrain swaps the attribute, not the object
        counts = self.class_counts()
        if model is None:
            raise NotReadyError(
                f"no suggestions before the first training: needs {self.min_labels_per_class} labels per class, "
                f"have {counts.tolist()}"
            )
        if (counts < self.min_labels_per_class).any():
            raise NotReadyError(
                f"suggestions are paused: relabels took a class below {self.min_labels_per_class} labels, "
                f"have {counts.tolist()}"
            )
        ids = list(cell_ids)
        if not ids:
            return []
        x = _lookup(features_by_cell if features_by_cell is not None else self.features, ids)
        member = model.member_proba(x)
        mean = member.mean(axis=0)
        cls = mean.argmax(axis=1)
        conf = mean[np.arange(len(ids)), cls]
        unc = np.clip(_entropy(mean) / np.log(self.n_classes), 0, 1)
        return [Suggestion(int(k), float(c), float(u)) for k, c, u in zip(cls, conf, unc, strict=True)]


# --------------------------------------------------------------------------------------------- bench


def bench_retrain(n_labels: int = 200, dim: int = 1280, repeats: int = 10, *, n_classes: int = 2,
                  seed: int = 0, **classifier_options: Any) -> dict[str, Any]:
    """Time :meth:`OnlineClassifier.retrain` (the default ensemble policy) on synthetic features.

    Features are ReLU-like non-negative Gaussian mixtures of dimension *dim* (like pooled CNN features)
    with a class-dependent shift in a few dimensions; one warm-up retrain is not timed.

    Returns
    -------
    dict
        ``median_ms``, ``p95_ms``, ``min_ms``, ``repeats``, ``n_labels``, ``dim``, ``n_members``,
        ``train_threads``, ``mean_epochs``, ``val_accuracy``.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n_labels) % n_classes
    x = rng.normal(0, 1, (n_labels, dim)).astype(np.float32)
    x[:, :16] += y[:, None] * 0.8
    x = np.maximum(x, 0)
    clf = OnlineClassifier(n_classes, features=x, seed=seed, **classifier_options)
    for i, c in enumerate(y):
        clf.add_label(i, int(c))
    clf.retrain()  # warm-up (first torch calls)
    times, epochs, accs = [], [], []
    for _ in range(repeats):
        report = clf.retrain()
        times.append(report.seconds * 1000)
        epochs.extend(report.epochs)
        accs.append(report.val_accuracy)
    t = np.asarray(times)
    return {
        "median_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95)), "min_ms": float(t.min()),
        "repeats": int(repeats), "n_labels": int(n_labels), "dim": int(dim), "n_members": clf.n_members,
        "train_threads": clf.train_options["num_threads"], "mean_epochs": float(np.mean(epochs)),
        "val_accuracy": float(np.mean(accs)),
    }
