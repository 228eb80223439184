import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ntsnet.backbones import PretrainedWeightsUnavailable, create_backbone, list_backbones


def classify(backbone, rgb, size=224):
    im = Image.fromarray(rgb).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(backbone.mean).view(3, 1, 1)) / torch.tensor(backbone.std).view(3, 1, 1)
    with torch.no_grad():
        return backbone.classifier(backbone(x[None]).mean((2, 3))).softmax(1)[0]


def test_registry_lists_the_supported_backbones():
    assert {"resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(list_backbones())
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vgg99")


@pytest.mark.parametrize("name", ["efficientnet_lite0"])
def test_bundled_lite_weights_are_genuine_imagenet_weights(name):
    backbone = create_backbone(name, pretrained=True, keep_classifier=True).eval()
    cat = classify(backbone, data.chelsea())
    assert int(cat.argmax()) == 285 and cat[285] > 0.5          # "Egyptian cat"
    cup = classify(backbone, data.coffee())
    assert int(cup.argmax()) == 967 and cup[967] > 0.5          # "espresso"
    random_init = create_backbone(name, pretrained=False, keep_classifier=True).eval()
    assert not torch.allclose(classify(random_init, data.chelsea()), cat)


def test_unreachable_resnet_weights_raise_a_helpful_error(monkeypatch):
    from torchvision.models import ResNet50_Weights

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(type(ResNet50_Weights.IMAGENET1K_V2), "get_state_dict", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NTSNET_RESNET50_WEIGHTS", raising=False)
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        create_backbone("resnet50", pretrained=True)
    msg = str(err.value)
    assert "resnet50" in msg and "efficientnet_lite0" in msg and "NTSNET_RESNET50_WEIGHTS" in msg


def test_resnet_weights_from_a_local_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    ref = resnet50()
    path = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    monkeypatch.setenv("NTSNET_RESNET50_WEIGHTS", str(path))
    backbone = create_backbone("resnet50", pretrained=True)
    torch.testing.assert_close(backbone.features[0].weight, ref.conv1.weight)


def test_backbone_without_weights_refuses_pretrained():
    with pytest.raises(PretrainedWeightsUnavailable, match="pretrained=False"):
        create_backbone("tiny", pretrained=True)
