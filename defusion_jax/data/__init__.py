"""Host-side input pipelines (grain): image sources, augmentation, per-process batches.

- `sources`: file indexes over image folders, paired IR/visible folders (MSRS layout) and COCO
  through tensorflow-datasets; unreadable or tiny images are skipped with a warning and counted.
- `augment`: the official host-side augmentation (darkening colour jitter, random resized crop,
  flips), seeded per element.
- `pipeline`: grain MapDataset -> seeded shuffle -> repeat -> augment -> this process's share of
  every global batch -> batch, as a checkpointable iterator.
"""

from defusion_jax.data.pipeline import make_stream, mix_streams, skipped_files  # noqa: F401
from defusion_jax.data.sources import (  # noqa: F401
    DataError, ImageFolderSource, PairedFolderSource, TfdsImageSource, build_source,
)
