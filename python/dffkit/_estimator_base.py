"""A minimal scikit-learn-style base used only where scikit-learn is not installed.

With scikit-learn present, ``dffkit.NMF`` derives from its BaseEstimator and mixins instead, so
it clones, pipelines and passes ``check_estimator``.
"""
from __future__ import annotations

import inspect

import numpy as np


class BaseEstimator:
    @classmethod
    def _get_param_names(cls):
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values()
                      if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def get_params(self, deep=True):
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params):
        valid = self._get_param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"Invalid parameter {key!r} for {type(self).__name__}; valid: {valid}")
            setattr(self, key, value)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def __sklearn_tags__(self):  # pragma: no cover - only reached with scikit-learn absent
        raise AttributeError


class TransformerMixin:
    def fit_transform(self, X, y=None, **params):
        return self.fit(X, y, **params).transform(X)


class FeaturesOutMixin:
    def get_feature_names_out(self, input_features=None):
        prefix = type(self).__name__.lower()
        return np.asarray([f"{prefix}{i}" for i in range(self._n_features_out)], dtype=object)
