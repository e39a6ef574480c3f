"""Raw images held compactly in memory, and the per-batch transform to a model's input.

:class:`ImageData` keeps the images as the source stores them (uint8 for IDX files, PNGs and uint8
arrays), so Fashion-MNIST's 60,000 training images cost 47 MB rather than the 2.4 GB of a
pre-resized 3x64x64 float32 copy. :class:`Transform` scales, converts channels, resizes and
normalises one batch at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetrain.errors import ConfigError, DataError

class DataWarning(UserWarning):
    """Data that load but deserve a word (a source without a test split); the CLI prints ``edgetrain: warning:``."""


UINT8_MAX = 255.0  # uint8 pixels scale to [0, 1] by /255 (the torchvision ToTensor convention)
STATS_CHUNK_ELEMENTS = 1 << 22  # channel statistics work on chunks of about 4M values (16 MB of float32)


def to_unit(raw: Tensor) -> Tensor:
    """Raw images as float32 in [0, 1]: uint8 divided by 255; float32 is already scaled (returned as is)."""
    if raw.dtype == torch.uint8:
        return raw.float().div_(UINT8_MAX)
    return raw.float()


def _resize(x: Tensor, size: int) -> Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    # antialiasing only changes the result when shrinking (it low-passes before subsampling)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h or size < w)


@dataclasses.dataclass(frozen=True)
class Transform:
    """Per-batch transform from raw images to a model's input.

    Steps, in order: scale to [0, 1] (uint8 / 255), grayscale (mean of the channels) if
    ``channels == 1``, bilinear resize, replicate gray if ``channels == 3``, normalise. Reducing to
    one channel happens before the resize and replicating after it, so neither does extra work.

    Args:
        image_size: output height and width (bilinear, antialiased when shrinking); ``None`` keeps the size.
        channels: 1 (mean of the channels) or 3 (replicate a gray channel); ``None`` keeps the channels.
        mean: per-channel mean subtracted after scaling; one value applies to every channel.
        std: per-channel standard deviation divided by; given together with ``mean``.
    """

    image_size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size <= 0):
            raise ConfigError(f"Transform.image_size: must be a positive int or None, got {self.image_size!r}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"Transform.channels: must be 1, 3 or None, got {self.channels!r}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("Transform.mean/std: give both or neither")
        if self.mean is not None and self.std is not None:
            mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
            if not mean or len(mean) != len(std):
                raise ConfigError(f"Transform.mean/std: need the same non-zero length, got {len(mean)} and {len(std)}")
            if min(std) <= 0:
                raise ConfigError(f"Transform.std: must be positive, got {std}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)

    def out_channels(self, in_channels: int) -> int:
        """Channels of the output for ``in_channels`` raw channels."""
        return self.channels if self.channels is not None else in_channels

    def __call__(self, raw: Tensor) -> Tensor:
        """Transform a raw batch (B, C0, H0, W0) (uint8 or float32) to float32 (B, C, H, W). Other samples (a
        table's (B, F), a series' (B, C, T)) are only normalised, per feature or channel (dimension 1)."""
        x = to_unit(raw)  # (B, C0, H0, W0) float32 in [0, 1]
        if x.ndim != 4:
            if self.mean is not None and self.std is not None:
                shape = (1, -1, *(1,) * (x.ndim - 2))
                x = x.sub(torch.tensor(self.mean).view(shape)).div_(torch.tensor(self.std).view(shape))
            return x.contiguous()
        if self.channels == 1 and x.shape[1] != 1:
            x = x.mean(1, keepdim=True)  # (B, 1, H0, W0)
        if self.image_size is not None:
            x = _resize(x, self.image_size)  # (B, C, S, S)
        if self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, S, S), a view
        elif self.channels is not None and x.shape[1] != self.channels:
            raise DataError(f"cannot turn {x.shape[1]}-channel images into {self.channels} channels")
        if self.mean is not None and self.std is not None:
            c = x.shape[1]
            if len(self.mean) not in (1, c):
                raise DataError(f"normalisation has {len(self.mean)} values for {c}-channel images")
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)  # (1, C or 1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            x = x.sub(mean).div_(std)  # (B, C, H, W), a new tensor
        return x.contiguous()  # (B, C, H, W) float32


def channel_stats(images: Tensor, channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of raw images scaled to [0, 1].

    Computed after the channel conversion of ``Transform(channels=channels)`` and before any resize,
    in chunks with float64 accumulators, so 60,000 uint8 images never become one float copy.
    """
    c0 = images.shape[1]
    gray = channels == 1 and c0 != 1
    chunk = max(1, STATS_CHUNK_ELEMENTS // max(1, images[0].numel()))
    total = torch.zeros(1 if gray else c0, dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = to_unit(images[i:i + chunk])  # (b, C0, H, W)
        if gray:
            x = x.mean(1, keepdim=True)  # (b, 1, H, W)
        dims = (0, *range(2, x.ndim))  # all but the channels (a table's features, a series' channels)
        total += x.sum(dims, dtype=torch.float64)
        squares += (x * x).sum(dims, dtype=torch.float64)
    n = images.numel() // c0
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)  # a constant channel keeps std > 0
    if channels == 3 and c0 == 1:
        mean, std = mean.expand(3), std.expand(3)
    return tuple(mean.tolist()), tuple(std.tolist())


@dataclasses.dataclass(eq=False, repr=False)
class ImageData:
    """A dataset split: raw images, labels, class names and the per-batch transform.

    Attributes:
        images: (N, C0, H0, W0) raw images, uint8 (0..255) or float32 (already in [0, 1]).
        labels: (N,) int64 class indices into ``classes``.
        classes: class names.
        name: where it came from, e.g. ``"fashion-mnist/train"``, ``"digits/test"`` or a file path.
        transform: applied by :meth:`batch` to each batch.
    """

    images: Tensor  # (N, C0, H0, W0) uint8 or float32, raw
    labels: Tensor  # (N,) int64
    classes: list[str]
    name: str
    transform: Transform = dataclasses.field(default_factory=Transform)

    def __post_init__(self) -> None:
        if self.images.ndim not in (2, 3, 4) or self.images.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"{self.name}: samples must be a uint8 or float32 (N, C, H, W) image, (N, C, T) series "
                            f"or (N, F) table tensor, got {self.images.dtype} of shape {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise DataError(f"{self.name}: labels must be an int64 tensor of shape ({len(self.images)},), "
                            f"got {self.labels.dtype} of shape {tuple(self.labels.shape)}")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(f"{self.name}: labels span {int(self.labels.min())}..{int(self.labels.max())}, "
                            f"outside the {len(self.classes)} classes")
        self._check_transform(self.transform)

    def _check_transform(self, t: Transform) -> None:
        c0 = self.images.shape[1]
        if self.images.ndim != 4 and (t.image_size is not None or t.channels is not None):
            raise DataError(f"{self.name}: samples of shape {tuple(self.images.shape[1:])} are not images; "
                            "image_size and channels apply to images only")
        if t.channels == 3 and c0 not in (1, 3):
            raise DataError(f"{self.name}: cannot turn {c0}-channel images into 3 channels")
        c = t.out_channels(c0)
        if t.mean is not None and len(t.mean) not in (1, c):
            raise DataError(f"{self.name}: normalisation has {len(t.mean)} values for {c}-channel images")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return (f"ImageData({self.name!r}, {len(self)} x {shape} {str(self.images.dtype).removeprefix('torch.')}, "
                f"{self.num_classes} classes, {self.transform})")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Transformed images ``x`` (B, C, H, W) float32 and labels ``y`` (B,) int64 at ``index``."""
        return self.transform(self.images[index]), self.labels[index]

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        """Batches in one epoch (a last partial batch counts only when ``drop_last`` is false)."""
        _check_positive("batch_size", batch_size)
        n = len(self) // batch_size if drop_last else -(-len(self) // batch_size)
        if n == 0:
            raise DataError(f"{self.name}: {len(self)} samples are fewer than one batch of {batch_size}")
        return n

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, start: int = 0,
                drop_last: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of one epoch, from batch number ``start`` on.

        The order depends only on ``(seed, epoch)``, through a local ``torch.Generator`` (the global
        RNG is neither read nor advanced), so a run resumed at batch ``start`` of ``epoch`` sees
        exactly the batches an uninterrupted run would.

        Yields:
            ``(x, y)``: x (B, C, H, W) float32, y (B,) int64.
        """
        n = self.steps_per_epoch(batch_size, drop_last)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n:
            raise ConfigError(f"batches: start must be an int in 0..{n}, got {start!r}")
        if shuffle:
            # seeds 1,000,003 apart: every (seed, epoch) with epoch < 1,000,003 gets its own stream
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(self), generator=generator)  # (N,)
        else:
            order = torch.arange(len(self))  # (N,)
        for b in range(start, n):
            yield self.batch(order[b * batch_size:(b + 1) * batch_size])

    def subset(self, n: int, *, seed: int = 0) -> ImageData:
        """A fixed random subset of ``n`` samples (the same for the same seed), in the original order."""
        _check_positive("subset n", n)
        if n > len(self):
            raise DataError(f"{self.name}: cannot take a subset of {n} from {len(self)} samples")
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values  # (n,)
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index],
                                   name=f"{self.name}[subset {n}, seed {seed}]")

    def with_transform(self, transform: Transform) -> ImageData:
        """The same images (shared, not copied) with another transform."""
        self._check_transform(transform)
        return dataclasses.replace(self, transform=transform)


def _check_positive(what: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{what}: must be a positive int, got {v!r}")
