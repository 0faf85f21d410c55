"""Learned rejection of predicted nuclei (issue 10 point 6: fewer false positives).

A model bundle may carry ``meta["rejection"]``: a logistic regression on measurements that
predict already computes for every nucleus (:mod:`cellseg.measurements` shape and optical-density
measurements, and the mean nucleus probability), stored as plain JSON numbers::

    {"features": ["log:Nucleus: Area µm^2", "Nucleus: Solidity", ...],
     "mean": [...], "scale": [...], "coef": [...], "intercept": -1.2, "threshold": 0.3}

A feature is a measurement name, or ``log:`` + a name for its natural logarithm (of the value
floored at :data:`LOG_FLOOR`). A nucleus is kept when ``sigmoid(coef · (x - mean) / scale +
intercept) >= threshold``, i.e. when the model's probability that it matches a true nucleus (IoU
>= 0.5) is at least the threshold. :func:`cellseg.nuclei.extract_region` applies it, so a rejected
nucleus is in none of predict's outputs (GeoJSON, journal, Zarr labels). Models without the entry
keep every nucleus, as before.

:func:`fit_logistic` fits the coefficients (L2-regularised maximum likelihood, scipy L-BFGS) on
standardised features; ``examples/fit_rejection.py`` collects the labels on training tiles and
chooses the threshold on validation tiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from .errors import ModelError

REJECTION_KEY = "rejection"  # its key in the model bundle's meta
LOG_PREFIX = "log:"
LOG_FLOOR = 1e-6  # log features of values <= 0 (never for areas and lengths of valid outlines)

# Cheap per-nucleus evidence that an object is not a nucleus: size and shape (fibres are long and
# thin, flakes irregular), haematoxylin/eosin optical densities (keratin and collagen are eosin,
# ink is dark in both) and how sure the network was.
DEFAULT_FEATURES: tuple[str, ...] = (
    "log:Nucleus: Area µm^2",
    "log:Nucleus: Perimeter µm",
    "Nucleus: Circularity",
    "Nucleus: Solidity",
    "log:Nucleus: Max caliper µm",
    "log:Nucleus: Min caliper µm",
    "Nucleus: Eccentricity",
    "Nucleus probability",
    "Nucleus: Hematoxylin OD mean",
    "Nucleus: Hematoxylin OD std dev",
    "Nucleus: Hematoxylin OD max",
    "Nucleus: Hematoxylin OD min",
    "Nucleus: Eosin OD mean",
    "Nucleus: Eosin OD std dev",
    "Nucleus: Eosin OD max",
    "Nucleus: Eosin OD min",
)


@dataclass(frozen=True)
class Rejection:
    """A fitted rejection: standardisation, logistic coefficients and the keep threshold."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    threshold: float

    def __post_init__(self) -> None:
        n = len(self.features)
        if n == 0:
            raise ValueError("no features")
        if not len(self.mean) == len(self.scale) == len(self.coef) == n:
            raise ValueError("features, mean, scale and coef differ in length")
        numbers = [*self.mean, *self.scale, *self.coef, self.intercept, self.threshold]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError("non-finite number")
        if min(self.scale) <= 0:
            raise ValueError("scale must be positive")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")

    @classmethod
    def from_dict(cls, spec: Mapping) -> Rejection:
        """From the JSON dict of ``meta["rejection"]`` (ValueError/TypeError/KeyError if bad)."""
        return cls(
            features=tuple(str(f) for f in spec["features"]),
            mean=tuple(float(v) for v in spec["mean"]),
            scale=tuple(float(v) for v in spec["scale"]),
            coef=tuple(float(v) for v in spec["coef"]),
            intercept=float(spec["intercept"]),
            threshold=float(spec["threshold"]),
        )

    def to_dict(self) -> dict:
        """Plain JSON numbers and strings (what the model bundle's meta stores)."""
        return {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "threshold": self.threshold,
        }

    def with_threshold(self, threshold: float) -> Rejection:
        return Rejection(
            self.features, self.mean, self.scale, self.coef, self.intercept, float(threshold)
        )

    def probability(self, x: np.ndarray) -> np.ndarray:
        """``N`` probabilities that each row of ``x`` (``N×F`` :func:`feature_matrix`) is a
        true nucleus."""
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return expit(z @ np.asarray(self.coef) + self.intercept)

    def keep(self, measurements: Sequence[Mapping[str, float]]) -> np.ndarray:
        """``N`` bool: which nuclei (their measurement dicts) the rejection keeps."""
        if not len(measurements):
            return np.zeros(0, dtype=bool)
        return self.probability(feature_matrix(measurements, self.features)) >= self.threshold


def feature_matrix(
    measurements: Sequence[Mapping[str, float]], features: Sequence[str]
) -> np.ndarray:
    """``N×F`` float64 feature values of ``N`` nuclei's measurement dicts.

    Raises:
        ModelError: a feature's measurement is missing (for example the optical densities, where
            predict read no pixels).
    """
    columns = []
    for feature in features:
        log = feature.startswith(LOG_PREFIX)
        name = feature[len(LOG_PREFIX) :] if log else feature
        try:
            values = np.asarray([float(m[name]) for m in measurements], dtype=np.float64)
        except KeyError:
            raise ModelError(f"the model's rejection needs the measurement {name!r}") from None
        columns.append(np.log(np.maximum(values, LOG_FLOOR)) if log else values)
    x = np.stack(columns, axis=1)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # QuPath's NaN measurements


def rejection_of(meta: Mapping | None) -> Rejection | None:
    """The rejection stored in a model's meta, or None when it has none."""
    spec = (meta or {}).get(REJECTION_KEY)
    if spec is None:
        return None
    try:
        return Rejection.from_dict(spec)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"invalid rejection in the model's meta ({exc})") from None


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    features: Sequence[str],
    l2: float = 1e-3,
    threshold: float = 0.5,
) -> Rejection:
    """L2-regularised logistic regression of ``y`` on standardised ``x``.

    Args:
        x: ``N×F`` feature values (:func:`feature_matrix`).
        y: ``N`` labels, 1 for a predicted nucleus matching a true one, 0 for a false positive.
        features: the ``F`` feature names.
        l2: penalty ``l2 · |coef|²`` added to the mean negative log-likelihood (not on the
            intercept); keeps the coefficients finite on separable data.
        threshold: the keep threshold stored (chosen later on validation).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != len(features):
        raise ValueError("x must be N×F with N labels and F feature names")
    if len(np.unique(y)) < 2:
        raise ValueError("need both true and false positives to fit a rejection")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale <= 0] = 1.0  # a constant feature: its coefficient stays near 0
    z = (x - mean) / scale
    sign = 2.0 * y - 1.0

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        margin = sign * (z @ w[:-1] + w[-1])
        value = -np.mean(log_expit(margin)) + l2 * np.dot(w[:-1], w[:-1])
        dmargin = -expit(-margin) * sign / len(y)  # d(-log σ(m))/dm = -σ(-m)
        grad = np.append(z.T @ dmargin + 2 * l2 * w[:-1], dmargin.sum())
        return value, grad

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B")
    w = result.x
    return Rejection(
        tuple(features),
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(w[:-1].tolist()),
        float(w[-1]),
        float(threshold),
    )
