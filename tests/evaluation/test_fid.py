"""Frechet distance: closed forms in an identity feature space, the shipped digits network, named features."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

pytest.importorskip("torchmetrics")

from ddim_plus.digits import load_digits  # noqa: E402
from ddim_plus.evaluation.digits import (  # noqa: E402
    DIGITS_FEATURES_FILE,
    DIGITS_FEATURES_NAME,
    digits_reference_images,
    load_digits_feature_net,
)
from ddim_plus.evaluation.fid import (  # noqa: E402
    FeatureWeightsUnavailableError,
    FrechetDistance,
    choose_features,
    frechet_distance,
    parse_features,
)
from ddim_plus.images import to_image_tensor  # noqa: E402


class PixelFeatures(nn.Module):
    """Identity feature map: the pixels of a 1x2x2 image are its four features."""

    name = "pixels"
    num_features = 4

    def forward(self, images):
        return images.flatten(1).double()


def gaussian_images(n, mean, std, seed):
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randn(n, 4, generator=generator, dtype=torch.float64) * std + mean
    return samples.view(n, 1, 2, 2)


def closed_form_frechet(x, y):
    """||mu_x - mu_y||^2 + Tr(Sx + Sy - 2 (Sx Sy)^1/2) from the sample statistics, with scipy's sqrtm."""
    x, y = x.flatten(1).numpy(), y.flatten(1).numpy()
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root))


def test_identical_sets_give_zero():
    images = gaussian_images(500, 0.5, 0.1, seed=0)
    result = frechet_distance(images, images.clone(), features=PixelFeatures())
    assert result.value == pytest.approx(0.0, abs=1e-6)


def test_shifted_set_gives_squared_shift():
    # Same covariance, so the trace term vanishes exactly and the distance is ||shift||^2.
    images = gaussian_images(400, 0.4, 0.05, seed=1)
    shift = torch.tensor([0.1, -0.05, 0.2, 0.0], dtype=torch.float64).view(1, 1, 2, 2)
    result = frechet_distance(images, images + shift, features=PixelFeatures())
    assert result.value == pytest.approx(float((shift**2).sum()), rel=1e-6)


def test_matches_gaussian_closed_form():
    x = gaussian_images(3000, 0.5, torch.tensor([0.05, 0.1, 0.02, 0.08], dtype=torch.float64), seed=2)
    y = gaussian_images(3000, 0.45, torch.tensor([0.1, 0.1, 0.04, 0.02], dtype=torch.float64), seed=3)
    result = frechet_distance(x, y, features=PixelFeatures())
    assert result.value == pytest.approx(closed_form_frechet(x, y), rel=1e-5)
    # And the population value for independent coordinates: 4 * 0.05^2 + sum of (std_x - std_y)^2.
    population = 4 * 0.05**2 + 0.05**2 + 0 + 0.02**2 + 0.06**2
    assert result.value == pytest.approx(population, rel=0.1)


def test_reference_statistics_kept_across_generated_sets():
    metric = FrechetDistance(PixelFeatures())
    reference = gaussian_images(300, 0.5, 0.1, seed=4)
    metric.update(reference, real=True)
    values = []
    for offset in (0.0, 0.1):
        metric.update(reference + offset, real=False)
        values.append(metric.compute().value)
        metric.reset()
    assert metric.num_real == 300 and metric.num_generated == 0
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert values[1] == pytest.approx(4 * 0.1**2, rel=1e-6)


def test_numpy_channels_last_equals_tensor():
    x = gaussian_images(200, 0.5, 0.1, seed=5).float()
    y = gaussian_images(200, 0.6, 0.1, seed=6).float()
    as_tensor = frechet_distance(x, y, features=PixelFeatures()).value
    as_numpy = frechet_distance(x.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy(), PixelFeatures()).value
    assert as_numpy == pytest.approx(as_tensor, rel=1e-6)


def test_digits_feature_net_loads_offline(offline_hf_home):
    net = load_digits_feature_net()
    assert DIGITS_FEATURES_FILE.endswith(".safetensors")
    images = digits_reference_images()
    labels = torch.from_numpy(load_digits().labels)
    with torch.no_grad():
        accuracy = (net.logits(images).argmax(1) == labels).float().mean().item()
    # Trained on 1,500 of these 1,797 digits; the file would be broken or stale below this.
    assert accuracy > 0.95
    assert net(images[:3]).shape == (3, net.num_features)


def test_digits_features_see_through_upsampling_and_rgb():
    net = load_digits_feature_net()
    small = digits_reference_images()[:16]
    large = torch.nn.functional.interpolate(small, scale_factor=4, mode="nearest").expand(-1, 3, -1, -1)
    torch.testing.assert_close(net(large), net(small))
    # The training-set preparation (bicubic to 16x16) moves the features a little, not to another digit.
    resized = digits_reference_images(resolution=16, channels=1)[:16]
    assert resized.shape == (16, 1, 16, 16)
    assert (net.logits(resized).argmax(1) == net.logits(small).argmax(1)).float().mean() > 0.9


def test_digits_distance_ranks_real_above_noise_and_reports_name():
    images = digits_reference_images()
    halves = frechet_distance(images[::2], images[1::2], features="digits")
    noise = frechet_distance(images[::2], torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert halves.features == DIGITS_FEATURES_NAME == noise.features
    assert 0 < halves.value < noise.value / 10
    assert DIGITS_FEATURES_NAME in str(halves)
    assert halves.num_real == 899 and halves.num_generated == 898


def test_custom_module_without_name_reports_its_class():
    flatten = nn.Flatten()
    with pytest.raises(ValueError, match="num_features"):
        FrechetDistance(flatten)
    flatten.num_features = 4
    result = frechet_distance(gaussian_images(10, 0.5, 0.1, 0), gaussian_images(10, 0.5, 0.1, 1), flatten)
    assert result.features == "Flatten"


def test_missing_digits_weights_raise_clear_error(tmp_path):
    with pytest.raises(FeatureWeightsUnavailableError, match="train_digits_features"):
        FrechetDistance(f"digits:{tmp_path / 'missing.safetensors'}")


def test_dinov2_loads_from_local_folder(tmp_path, offline_hf_home):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=56, image_size=224
    )
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "tiny-dinov2")
    metric = FrechetDistance(f"dinov2:{tmp_path / 'tiny-dinov2'}")
    images = digits_reference_images()[:40]
    metric.update(images, real=True)
    metric.update(images, real=False)
    result = metric.compute()
    assert result.features == "dinov2(tiny-dinov2)"
    assert result.value == pytest.approx(0.0, abs=1e-4)


def test_dinov2_offline_without_weights_raises(offline_hf_home):
    pytest.importorskip("transformers")
    with pytest.raises(FeatureWeightsUnavailableError, match="not available locally"):
        FrechetDistance("dinov2:facebook/dinov2-small")


def test_inception_without_weights_raises_instead_of_downloading(tmp_path):
    with pytest.raises(FeatureWeightsUnavailableError):
        FrechetDistance(f"inception:{tmp_path / 'pt_inception.pth'}")


@pytest.mark.parametrize("spec", ["fid", "dinov2", "clip:foo"])
def test_bad_feature_spec_raises(spec):
    with pytest.raises(ValueError, match="features"):
        parse_features(spec)


def test_images_out_of_range_raise():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_image_tensor(torch.full((2, 1, 8, 8), -1.0))
    with pytest.raises(ValueError, match="Need at least 2"):
        frechet_distance(digits_reference_images()[:1], digits_reference_images()[:5])


def save_tiny_dinov2(folder):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=56, image_size=224
    )
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(folder)


def put_in_hub_cache(hf_home, repo_id, folder):
    """Lay `folder` out as the Hub cache holds a downloaded repo (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    folder.rename(repo / "snapshots" / commit)


def test_choose_features_fits_the_data_and_never_downloads(tmp_path, offline_hf_home, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torch hub: no Inception weights
    # huggingface_hub reads HF_HOME at import: point its cache constant at the fixture's empty cache too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline_hf_home / "hub"))
    assert choose_features(digits_data=True) == "digits"
    pytest.importorskip("transformers")
    with pytest.raises(FeatureWeightsUnavailableError, match="No quality metric is available.*no DINOv2 weights"):
        choose_features(digits_data=False)
    save_tiny_dinov2(tmp_path / "dinov2")
    put_in_hub_cache(offline_hf_home, "facebook/dinov2-base", tmp_path / "dinov2")
    spec = choose_features(digits_data=False)
    assert spec == "dinov2:facebook/dinov2-base"
    assert FrechetDistance(spec).features_name == "dinov2(dinov2-base)"


def test_inception_download_failure_is_one_clear_error(monkeypatch):
    """Offline, torch-fidelity's download raises URLError: reported as missing weights, with the offline fix."""
    import urllib.error

    import torchmetrics.image.fid
    import torchmetrics.utilities.imports

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchmetrics.utilities.imports, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(torchmetrics.image.fid, "FrechetInceptionDistance", offline)
    with pytest.raises(FeatureWeightsUnavailableError, match="could not be downloaded.*'inception:PATH'"):
        FrechetDistance("inception")
