"""The backbone catalog as plain data: names and where each torchvision trunk's parts sit.

This is the one list of backbones. ``models`` turns each entry into a torchvision constructor;
``config`` checks a requested name against it. It imports nothing beyond the standard library, so
the web process can validate hyperparameters (and list the choices) without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKBONE_CATALOG", "BackboneInfo", "list_backbones"]


@dataclass(frozen=True)
class BackboneInfo:
    """One catalog entry.

    ``constructor`` is the torchvision.models function name; ``feature_dim`` the size of the pooled
    feature vector; ``classifier`` the attribute path of the final ImageNet Linear that is replaced
    by an identity; ``stem`` the first convolution (replaced when the input is not 3-channel);
    ``ignored_prefixes`` the torchvision checkpoint keys of that classifier, skipped when loading.
    """

    constructor: str
    feature_dim: int
    classifier: str
    stem: str
    ignored_prefixes: tuple[str, ...]


BACKBONE_CATALOG: dict[str, BackboneInfo] = {
    "resnet18": BackboneInfo("resnet18", 512, "fc", "conv1", ("fc.",)),
    "resnet34": BackboneInfo("resnet34", 512, "fc", "conv1", ("fc.",)),
    "resnet50": BackboneInfo("resnet50", 2048, "fc", "conv1", ("fc.",)),
    "mobilenet_v2": BackboneInfo("mobilenet_v2", 1280, "classifier", "features.0.0", ("classifier.",)),
    "mobilenet_v3_small": BackboneInfo(
        "mobilenet_v3_small", 576, "classifier", "features.0.0", ("classifier.",)
    ),
    "mobilenet_v3_large": BackboneInfo(
        "mobilenet_v3_large", 960, "classifier", "features.0.0", ("classifier.",)
    ),
    "efficientnet_b0": BackboneInfo("efficientnet_b0", 1280, "classifier", "features.0.0", ("classifier.",)),
    # ConvNeXt's classifier starts with a LayerNorm that belongs to the trunk: only the Linear goes.
    "convnext_tiny": BackboneInfo("convnext_tiny", 768, "classifier.2", "features.0.0", ("classifier.2.",)),
}


def list_backbones() -> list[str]:
    """Names of the backbones the engine can build, sorted."""
    return sorted(BACKBONE_CATALOG)
