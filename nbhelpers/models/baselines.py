"""Baseline classifiers from the seeds' comparison tables, taken from timm or torchvision.

Seed 000 compares with ResNet50, VGG16, EfficientNet, DenseNet, MobileViT and MobileNetV2; seed
001 with SqueezeNet, MobileNetV2 and ShuffleNetV2 (Li et al.).  DenseNet121 lives in
:mod:`.densenet_cbam` so it shares the seed-001 code path.  timm adapts pretrained first convs to
``in_chans`` itself; for torchvision models :func:`.pretrained.replace_input_conv` does it.
"""

from __future__ import annotations

from typing import Any

import timm
import torchvision
from torch import nn

from .pretrained import replace_input_conv, timm_model, torchvision_state_dict
from .registry import register_model, set_cam_layers

# name -> (timm model, Grad-CAM layer, description).  VGG's CAM layer is the last ReLU before the
# final max-pool; the others take the last feature block before global pooling.
TIMM_BASELINES: dict[str, tuple[str, str, str]] = {
    "resnet50": ("resnet50", "layer4.2", "ResNet50 (seed 000/003 baseline)"),
    "vgg16": ("vgg16", "features.29", "VGG16 (seed 000 baseline)"),
    "efficientnet_b0": ("efficientnet_b0", "bn2", "EfficientNet-B0 (seed 000 baseline)"),
    "mobilevit_s": ("mobilevit_s", "final_conv", "MobileViT-S (seed 000 baseline)"),
    "mobilenetv2": ("mobilenetv2_100", "bn2", "MobileNetV2 1.0 (seed 000 ablation row 1; seed 001 comparison)"),
}


def _timm_builder(name: str, timm_name: str, cam_layer: str):
    def build(num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
        kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
        model = timm_model(timm_name, **kwargs) if pretrained else timm.create_model(timm_name, **kwargs)
        return set_cam_layers(model, [cam_layer])

    build.__name__ = name
    build.__doc__ = f"timm {timm_name} with a {{num_classes}}-way head and {{in_chans}} input channels."
    return build


for _name, (_timm_name, _cam, _desc) in TIMM_BASELINES.items():
    register_model(_name, source="timm", description=_desc)(_timm_builder(_name, _timm_name, _cam))


@register_model("squeezenet", source="torchvision", description="SqueezeNet 1.1 (seed 001 comparison, Li et al.)")
def squeezenet(num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    """torchvision SqueezeNet 1.1; its classifier conv is replaced by a ``num_classes`` one."""
    model = torchvision.models.squeezenet1_1(weights=None)
    if pretrained:
        weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
        model.load_state_dict(torchvision_state_dict(weights, "squeezenet"))
    model.features[0] = replace_input_conv(model.features[0], in_chans)
    old = model.classifier[1]
    model.classifier[1] = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    return set_cam_layers(model, ["features.12"])


@register_model("shufflenetv2", source="torchvision", description="ShuffleNetV2 1.0x (seed 001 comparison, Li et al.)")
def shufflenetv2(num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    """torchvision ShuffleNetV2 1.0x with a ``num_classes`` head and ``in_chans`` input channels."""
    model = torchvision.models.shufflenet_v2_x1_0(weights=None)
    if pretrained:
        weights = torchvision.models.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1
        model.load_state_dict(torchvision_state_dict(weights, "shufflenetv2"))
    model.conv1[0] = replace_input_conv(model.conv1[0], in_chans)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return set_cam_layers(model, ["conv5"])
