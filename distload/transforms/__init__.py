"""Key transforms: rename, split fused tensors, merge or stack separate ones, transpose.

* :mod:`~distload.transforms.views` -- views and links, and applying transforms to an index;
* :mod:`~distload.transforms.ops` -- the transforms themselves.
"""

from distload.transforms.ops import Merge, Rename, Split, Stack, Transpose
from distload.transforms.views import Link, Transform, View, apply_transforms, identity_views

__all__ = [
    "Link",
    "Merge",
    "Rename",
    "Split",
    "Stack",
    "Transform",
    "Transpose",
    "View",
    "apply_transforms",
    "identity_views",
]
