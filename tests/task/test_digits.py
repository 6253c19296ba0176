"""The digits demo's data: scikit-learn's bundled digits, read from its CSV file without importing scikit-learn,
equal to what `sklearn.datasets.load_digits` gives; the fallback through scikit-learn where the file is elsewhere."""
import numpy as np
import pytest

import tasks.digits as digits


def test_the_bundled_file_is_read_as_scikit_learn_reads_it():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    pixels, labels = digits.load_digits_arrays()
    reference = load_digits()
    assert pixels.shape == (1797, 64) and np.array_equal(pixels, reference.data)
    assert labels.dtype == np.int64 and np.array_equal(labels, reference.target)


def test_without_the_file_it_asks_scikit_learn(monkeypatch, tmp_path):
    pytest.importorskip("sklearn")
    import copy
    import importlib.util
    real = importlib.util.find_spec

    def elsewhere(name, *args):
        spec = copy.copy(real(name, *args))  # never the imported module's own spec
        if name == "sklearn":  # a package whose data folder is not beside its __init__.py
            spec.origin = str(tmp_path / "__init__.py")
        return spec
    monkeypatch.setattr(importlib.util, "find_spec", elsewhere)
    pixels, labels = digits.load_digits_arrays()
    assert pixels.shape == (1797, 64) and labels.shape == (1797,)
