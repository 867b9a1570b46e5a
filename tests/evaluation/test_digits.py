"""ddim_plus.evaluation.digits: the recognisable fraction and class histogram of generated digits."""

import os

import numpy as np
import pytest
import torch

from ddim_plus.digits import DIGITS_FILE, load_digits
from ddim_plus.evaluation.digits import (
    class_balance,
    class_histogram,
    classify_digits,
    digits_report,
    fit_digits_classifier,
    get_digits_classifier,
    load_digits_feature_net,
    recognisable_fraction,
)


@pytest.fixture(scope="module")
def real_digits_16():
    """The bundled digits as the trainer sees them (16x16), scaled back to [0, 1] images (B, H, W, 1)."""
    from ddim_plus.training.data import load_digits_dataset

    dataset = load_digits_dataset(16).select(range(300))
    return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in dataset["image"]])[..., None]


def test_bundled_digits_are_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    expected = sklearn_datasets.load_digits()
    digits = load_digits()
    assert digits.images.dtype == np.uint8 and digits.images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(digits.images, expected.images)
    np.testing.assert_array_equal(digits.labels, expected.target)


def test_bundled_digits_are_small_and_attributed():
    assert os.path.getsize(DIGITS_FILE) < 115_000
    notice = open(os.path.join(os.path.dirname(DIGITS_FILE), "README.md"), encoding="utf-8").read()
    assert "CC BY 4.0" in notice and "Alpaydin" in notice and "digits.npz" in notice


def test_one_network_classifies_and_supplies_the_fd_features():
    # The classifier's digit is the shipped network's own ten-way argmax (the "not a digit" head only adds a
    # reject option), and the network is the one `FrechetDistance(features="digits")` uses.
    images, labels = load_digits()
    classifier = get_digits_classifier()
    net = load_digits_feature_net()
    assert all(torch.equal(a, b) for a, b in zip(classifier.net.state_dict().values(), net.state_dict().values()))
    predicted, _ = classify_digits(images / 16)
    with torch.no_grad():
        own_argmax = net.logits(torch.from_numpy(images / 16).float()[:, None]).argmax(1).numpy()
    np.testing.assert_array_equal(predicted, own_argmax)
    assert np.mean(predicted == labels) > 0.95


def test_real_digits_are_recognisable_and_balanced(real_digits_16):
    report = digits_report(real_digits_16)
    assert report["num_samples"] == 300
    assert report["recognisable_fraction"] > 0.95
    assert sum(report["class_histogram"]) == 300
    assert report["class_balance"] > 0.95
    # Colour images are averaged to grey, so an RGB copy scores the same.
    rgb = np.repeat(real_digits_16, 3, axis=-1)
    assert recognisable_fraction(rgb) == report["recognisable_fraction"]
    assert class_histogram(rgb) == report["class_histogram"]


def test_noise_and_blanks_are_not_recognisable(real_digits_16):
    rng = np.random.default_rng(0)
    assert recognisable_fraction(rng.random((200, 16, 16, 1))) < 0.05
    assert recognisable_fraction(np.zeros((4, 16, 16, 1))) == 0.0
    shuffled = np.stack([rng.permutation(image.ravel()).reshape(image.shape) for image in real_digits_16[:100]])
    assert recognisable_fraction(shuffled) < 0.1


def test_class_balance_extremes():
    assert class_balance([7] + [0] * 9) == 0.0
    assert class_balance([5] * 10) == pytest.approx(1.0)
    assert 0.0 < class_balance([5, 5] + [0] * 8) < 1.0
    assert class_balance([0] * 10) == 0.0


def test_fitting_is_deterministic():
    images, labels = load_digits()
    pixels = images.reshape(len(images), -1) / 16
    net = load_digits_feature_net()
    first = fit_digits_classifier(net, pixels[:500], labels[:500], seed=1, num_steps=50)
    second = fit_digits_classifier(net, pixels[:500], labels[:500], seed=1, num_steps=50)
    images = images[500:600] / 16
    assert np.array_equal(classify_digits(images, first)[1], classify_digits(images, second)[1])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"`images` must have shape \(B, H, W, C\) or \(B, H, W\), got \(16,\)"):
        classify_digits(np.zeros(16))
