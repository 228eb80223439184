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


def test_any_timm_model_by_name_with_weights_from_a_local_file(tmp_path, monkeypatch):
    """``timm/NAME`` builds any timm model; offline its weights come from NTSNET_TIMM_WEIGHTS, and without them the
    error says what to do (never random weights in silence)."""
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NTSNET_TIMM_WEIGHTS", str(path))
    backbone = create_backbone("timm/test_efficientnet", pretrained=True)
    torch.testing.assert_close(backbone.features.net.conv_stem.weight, ref.conv_stem.weight)
    assert backbone.out_channels == ref.num_features and backbone(torch.zeros(1, 3, 64, 64)).shape[1] == ref.num_features
    monkeypatch.delenv("NTSNET_TIMM_WEIGHTS")
    with pytest.raises(PretrainedWeightsUnavailable, match="NTSNET_TIMM_WEIGHTS"):
        create_backbone("timm/test_efficientnet", pretrained=True)
    with pytest.raises(ValueError, match="timm has no model"):
        create_backbone("timm/no_such_net", pretrained=False)


def test_a_timm_backbone_trains_folds_exports_and_answers_like_any_other(tmp_path):
    from ntsnet import NTSConfig, NTSNet, Predictor, load_checkpoint, nts_loss, save_checkpoint
    from ntsnet.fuse import TrainingFold

    cfg = NTSConfig(backbone="timm/test_efficientnet", input_size=96, part_size=48, proposal_num=4, cat_num=2, num_classes=3)
    model = NTSNet(cfg, pretrained=False)
    x = torch.randn(4, 3, 96, 96)
    assert model.backbone.early_parameters(8) and TrainingFold(model.backbone, torch.randn(1, 3, 64, 64)).pairs
    nts_loss(model.train()(x), torch.tensor([0, 1, 2, 0]), cfg)["total"].backward()
    path = save_checkpoint(tmp_path / "m.safetensors", model.eval(), ["a", "b", "c"])
    assert load_checkpoint(path).config.backbone == "timm/test_efficientnet"
    eager = Predictor.from_checkpoint(path, backend="torch", precision="fp32")
    compiled = Predictor.from_checkpoint(path, backend="openvino", precision="fp32", background=False)
    assert compiled.engine is not None and eager.net is not eager.model  # folded, and exported to OpenVINO
    photo = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    a, b = eager.predict(photo), compiled.predict(photo)
    assert a.label == b.label and abs(a.confidence - b.confidence) < 1e-3 and len(a.boxes) == 2


def test_checkpoints_saved_with_the_former_lite_module_still_load():
    """Before timm, Lite's parameters had the PyPI package's names (``_blocks.3._bn1``): they are renamed on load."""
    from ntsnet import NTSConfig, NTSNet
    from ntsnet.backbones import lite_key_map
    from ntsnet.checkpoint import Checkpoint, build_model

    cfg = NTSConfig(backbone="efficientnet_lite0", input_size=96, part_size=48, proposal_num=4, cat_num=2, num_classes=3)
    model = NTSNet(cfg, pretrained=False).eval()
    new_to_old = {v: k for k, v in lite_key_map(0).items()}
    prefix = "backbone.features.net."
    old_state = {(prefix + new_to_old[k[len(prefix):]] if k.startswith(prefix) else k): v for k, v in model.state_dict().items()}
    assert any("._blocks.6._bn1." in k for k in old_state)
    loaded = build_model(Checkpoint(cfg, ["a", "b", "c"], old_state, {}, "")).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).concat_logits, model(x).concat_logits)
