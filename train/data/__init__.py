"""Training data: TSV manifests, aspect-ratio buckets, resumable sharded order, the image-text loader,
and the reader of a latent/text cache."""

from selfe.train.data.buckets import (
    DEFAULT_ASPECT_RATIOS,
    Bucket,
    BucketConfig,
    ResolutionSchedule,
    bucket_for_aspect,
)
from selfe.train.data.cached import CachedDataset
from selfe.train.data.images import (
    ImageReadError,
    load_for_bucket,
    read_image_size,
    resize_center_crop,
    to_tensor,
)
from selfe.train.data.loader import DataConfig, ImageTextLoader, LoaderConfig, build_loaders, open_cache
from selfe.train.data.manifest import (
    REASONS,
    DataStats,
    EmptyManifestError,
    Manifest,
    ManifestConfig,
    Sample,
    scan_manifest,
)
from selfe.train.data.sampler import BatchPlan, BucketBatchSampler

__all__ = [
    "DEFAULT_ASPECT_RATIOS",
    "REASONS",
    "BatchPlan",
    "Bucket",
    "BucketBatchSampler",
    "BucketConfig",
    "CachedDataset",
    "DataConfig",
    "DataStats",
    "EmptyManifestError",
    "ImageReadError",
    "ImageTextLoader",
    "LoaderConfig",
    "Manifest",
    "ManifestConfig",
    "ResolutionSchedule",
    "Sample",
    "build_loaders",
    "bucket_for_aspect",
    "load_for_bucket",
    "open_cache",
    "read_image_size",
    "resize_center_crop",
    "scan_manifest",
    "to_tensor",
]
