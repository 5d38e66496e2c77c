"""Models by name: ``create_model("resnet50" | "alexnet_bn" | "alexnet_bn_caffe" | "digits_cnn", num_classes,
in_channels)``, and the sizes of their parameter tensors (``parameter_sizes``)."""

from __future__ import annotations

from torch import nn

from ipex_lars.models.alexnet_bn import AlexNetBN
from ipex_lars.models.alexnet_bn_caffe import AlexNetBNCaffe
from ipex_lars.models.digits_cnn import DigitsCNN


def _resnet50(num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


MODELS = {
    "resnet50": _resnet50,
    "alexnet_bn": lambda num_classes, in_channels: AlexNetBN(num_classes, in_channels),
    "alexnet_bn_caffe": lambda num_classes, in_channels: AlexNetBNCaffe(num_classes, in_channels),
    "digits_cnn": lambda num_classes, in_channels: DigitsCNN(num_classes, in_channels),
}


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model; raises ValueError naming the choices for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes, in_channels)


def parameter_sizes(name: str, num_classes: int = 1000, in_channels: int = 3) -> list[int]:
    """Element counts of the named model's parameter tensors, in order.

    The model is built on the meta device: shapes only, no memory and no initialisation, so
    counting ResNet-50 costs next to nothing.
    """
    import torch

    if name == "resnet50":
        import torchvision  # noqa: F401  imported first: its import fails under a device context
    with torch.device("meta"):
        model = create_model(name, num_classes, in_channels)
    return [p.numel() for p in model.parameters()]
