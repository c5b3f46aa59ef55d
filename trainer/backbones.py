"""The backbone table: every --model_type, once, without importing Keras.

Each entry names its family (models.py has one builder per family), the
arguments that builder takes, the width of the pooled features it returns,
the image size the network was designed for, the image sizes it can take,
and whether Keras provides ImageNet weights for it (the `imagenet` keyword of
--pretrained_checkpoint_path). The flag's choices, --help, the image-size
check and the model builder all read this table.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str  # the --model_type value
    family: str  # "resnet" | "vit" | "swin" (KerasHub backbones from config) | "efficientnet" (keras.applications)
    image_size: int  # pixels per side the architecture was designed for
    args: tuple  # the family builder's arguments
    features: int  # width of the pooled features the builder returns
    imagenet: bool = False  # Keras can download ImageNet weights for it
    min_image_size: int = 16
    size_multiple: int = 1  # --image_size must be a multiple of this


def _resnet(depth, block_type, blocks):
    return Backbone(f"resnet-{depth}", "resnet", 224, (block_type, blocks),
                    features=512 if block_type == "basic_block" else 2048)


def _vit(size, hidden_dim, num_heads, mlp_dim):
    # ViT/16, 12 layers: the image is cut into 16-pixel patches, so its side is a multiple of 16.
    return Backbone(f"vit-{size}", "vit", 224, (16, 12, num_heads, hidden_dim, mlp_dim), features=hidden_dim,
                    size_multiple=16)


def _swin(size, embed_dim, depths, num_heads):
    # Patches of 4 pixels, merged 2x2 between its 4 stages, attend within 7x7-token windows. KerasHub's
    # Swin fails on a stage narrower than its window and misplaces tokens on one that is not a whole
    # number of windows, so every stage's side must be a multiple of 7: the image's of 4 * 2**3 * 7 = 224.
    return Backbone(f"swin-{size}", "swin", 224, (4, 7, embed_dim, depths, num_heads), features=8 * embed_dim,
                    min_image_size=224, size_multiple=224)


_EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)
_EFFICIENTNET_FEATURES = (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560)

BACKBONES = {
    b.name: b for b in (
        _resnet(18, "basic_block", (2, 2, 2, 2)),
        _resnet(34, "basic_block", (3, 4, 6, 3)),
        _resnet(50, "bottleneck_block", (3, 4, 6, 3)),
        _resnet(101, "bottleneck_block", (3, 4, 23, 3)),
        _resnet(152, "bottleneck_block", (3, 8, 36, 3)),
        _resnet(200, "bottleneck_block", (3, 24, 36, 3)),
        *(Backbone(f"efficientnet-b{i}", "efficientnet", size, (f"EfficientNetB{i}",), features=features,
                   imagenet=True, min_image_size=32)
          for i, (size, features) in enumerate(zip(_EFFICIENTNET_SIZES, _EFFICIENTNET_FEATURES))),
        _vit("tiny", 192, 3, 768),
        _vit("small", 384, 6, 1536),
        _vit("base", 768, 12, 3072),
        _swin("tiny", 96, (2, 2, 6, 2), (3, 6, 12, 24)),
        _swin("small", 96, (2, 2, 18, 2), (3, 6, 12, 24)),
        _swin("base", 128, (2, 2, 18, 2), (4, 8, 16, 32)),
    )
}

# Networks other trainers offer that this one does not build, and why (PAI EasyVision lists XCiT).
NOT_BUILT = {"xcit": "XCiT has no maintained Keras implementation"}


def names_in_short():
    """Every --model_type in one short line, a family at a time: 'resnet-18|34|50|..., efficientnet-b0..b7, ...'."""
    groups = []
    for family in dict.fromkeys(b.family for b in BACKBONES.values()):
        names = [b.name for b in BACKBONES.values() if b.family == family]
        stem = names[0].rpartition("-")[0] + "-"
        tails = [name[len(stem):] for name in names]
        letters = tails[0].rstrip("0123456789")
        first = tails[0][len(letters):]
        run = first.isdigit() and tails == [f"{letters}{int(first) + i}" for i in range(len(tails))]
        groups.append(stem + (f"{tails[0]}..{tails[-1]}" if run else "|".join(tails)))
    return ", ".join(groups)
