"""Attention-guided view generation for contrastive self-supervised learning: a notebook-first, reproducible companion.

Modules:

- `attnssl.attention`: Where the model looks: CLS attention of any ViT (random, saved, pretrained, or the DINO-trained one that `experiments` builds), a CNN feature-norm heatmap, or the ground-truth mask; one post-processing recipe; a per-index cache.
- `attnssl.augment`: Batched, per-sample-random SimCLR / BYOL views on the tensors' device, with masks and attention maps carried through exactly the same crop and flip as their image.
- `attnssl.datasets`: One item format for every dataset, a fast in-memory `TensorDataset`, a deterministic sharded loader, and loaders for the official files of STL-10, CIFAR-10/100, Tiny ImageNet, Fashion-MNIST and any image folder.
- `attnssl.methods`: SimCLR, MoCo v1/v2, BYOL, SimSiam, NNCLR, DINO and an InstDisc memory bank behind one interface: `method(views, batch, roles) -> dict(loss, z, h0, p_pos, s_pos, s_neg)`.
- `attnssl.models`: Backbones (ResNet-18/50 with a small-image stem and a width knob; timm ViTs at any resolution), MLP heads, and the EMA helper that momentum encoders share.
- `attnssl.pretext`: RotNet, Jigsaw, the context encoder and PIRL as `Method`s: each builds its own labels or targets from the views a view generator gives, and trains through the same trainer and run cache as the contrastive methods.
- `attnssl.synthetic`: Procedurally generated object-on-clutter images with ten shape classes, ground-truth masks and boxes: deterministic, vectorised, cached, no download."""

__version__ = "0.1.0"

# The embedded dataset registers itself: `synthetic` (above `datasets` in the module order of
# tests/test_layering.py) calls `datasets.register_dataset("clutter")`. Importing it here, where the package
# starts, makes `get_dataset("clutter")` work whichever attnssl module is imported first, with no module
# importing one above it. (This line is kept by hand below the docstring that nbdev-export writes.)
from . import synthetic as _synthetic  # noqa: E402,F401
# Likewise, methods defined above `methods` register their names on import (`methods.register_method`):
# importing them here makes `build_method("rotnet")` or `build_method("harl")` work after `import attnssl`.
from . import pretext as _pretext, pixel as _pixel  # noqa: E402,F401
