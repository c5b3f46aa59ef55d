"""The backbone table: every --model_type, once, without importing Keras.

Each entry names its family (models.py has one builder per family), the
arguments that builder takes, the image size the network was designed for,
and whether Keras provides ImageNet weights for it (the `imagenet` keyword of
--pretrained_checkpoint_path). The flag's choices, --help and the model
builder all read this table.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str  # the --model_type value
    family: str  # "resnet" (KerasHub ResNetBackbone from config) | "efficientnet" (keras.applications)
    image_size: int  # pixels per side the architecture was designed for
    args: tuple  # the family builder's arguments
    imagenet: bool = False  # Keras can download ImageNet weights for it
    min_image_size: int = 16


def _resnet(depth, block_type, blocks):
    return Backbone(f"resnet-{depth}", "resnet", 224, (block_type, blocks))


_EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)

BACKBONES = {
    b.name: b for b in (
        _resnet(18, "basic_block", (2, 2, 2, 2)),
        _resnet(34, "basic_block", (3, 4, 6, 3)),
        _resnet(50, "bottleneck_block", (3, 4, 6, 3)),
        _resnet(101, "bottleneck_block", (3, 4, 23, 3)),
        _resnet(152, "bottleneck_block", (3, 8, 36, 3)),
        _resnet(200, "bottleneck_block", (3, 24, 36, 3)),
        *(Backbone(f"efficientnet-b{i}", "efficientnet", size, (f"EfficientNetB{i}",), imagenet=True, min_image_size=32)
          for i, size in enumerate(_EFFICIENTNET_SIZES)),
    )
}
