"""Model zoo: CIFAR KD-benchmark architectures and torchvision ImageNet models.

    from ickd.models import create_model, list_models, load_pretrained, MODELS
    model = create_model("resnet32x4", num_classes=100)
    logits, feat = model(x)          # feat: (B, model.feature_dim), the pooled penultimate vector
    load_pretrained(model, "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")

CIFAR models keep the parameter names of the RepDistiller / mdistiller definitions so the published
teacher checkpoints load unchanged; each family module says which reference file it follows.
"""
from ickd.models.factory import MODELS, create_model, list_models

# Importing the family modules registers their models.
from ickd.models import (  # noqa: E402,F401  (imported for registration side effects)
    cifar_mobilenetv2,
    cifar_resnet,
    cifar_resnetv2,
    cifar_shufflenet,
    cifar_vgg,
    cifar_wrn,
    imagenet,
    imagenet_mobilenetv1,
)
from ickd.models.checkpoint import load_pretrained
from ickd.models.features import FEATURE_KEYS, forward_features, has_stage_features

__all__ = ["FEATURE_KEYS", "MODELS", "create_model", "forward_features", "has_stage_features", "list_models", "load_pretrained"]
