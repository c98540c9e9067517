"""data.decode "device": a batch of JPEGs decoded on the training device, in one call.

The loader workers only read the shards and each JPEG's header (`batching.JpegBatcher`); the
rank's process then gets a `JpegBatch` where it would get decoded images, and the training loop
calls `JpegBatch.decode(device, labels)` where it places a batch on the device
(`jobs.training.loop.DevicePrefetcher`: on CUDA one batch ahead, on a side stream):

1. `torchvision.io.decode_jpeg(list of byte tensors, device=device)`: nvJPEG's batched decoder
   on a GPU, libjpeg-turbo on the CPU (so a CPU-only CI runs the whole path);
2. each image's view (the crop box and flip that the worker chose with `choose_view`, as the
   CPU path does) resized to S x S by antialiased bilinear interpolation, PIL's filter in the
   CPU path, and rounded to whole pixel values as PIL's uint8 output is;
3. the flips, then the normalisation (x / 255 - mean) / std, in float32.

Images with the same crop size are resized in one call, and the batch keeps its order.
Nothing is read back from the device. An image that
passed the worker's header check and still fails to decode is dropped from its batch and
reported (`report_bad`, counted as bad_image); the batch is then decoded one image at a time
to find it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jobs.data.batching import normalise_in_place
from jobs.data.shards import DataPipelineError


def decode_jpegs(chunks: list[torch.Tensor], channels: int, device: torch.device):
    """JPEG byte tensors (uint8 [n_bytes], on the CPU) -> uint8 [channels, H, W] on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(chunks, mode=mode, device=device)


@dataclass
class JpegBatch:
    """One batch of JPEGs as a loader worker sent it, decoded by `decode`.

    `data` holds the images' bytes back to back (uint8 [total], CPU), `lengths` their sizes;
    `boxes` the crop of each (left, top, right, bottom), `flips` whether to mirror it; `keys`
    name the samples in error messages. `scale` and `shift` are per channel.
    """

    data: torch.Tensor
    lengths: list[int]
    boxes: list[list[int]]
    flips: list[bool]
    keys: list[str]
    size: int
    channels: int
    scale: list[float]
    shift: list[float]
    report_bad: Callable[[int, str], None] | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def decode(
        self, device: torch.device | str, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 [n, channels, size, size] normalised, labels [n] long), both on
        `device`. Raises DataPipelineError when no image of the batch decodes."""
        device = torch.device(device)
        chunks = list(torch.split(self.data, self.lengths))
        kept = list(range(len(chunks)))
        try:
            pictures = decode_jpegs(chunks, self.channels, device)
        except RuntimeError:
            pictures, kept = self._decode_each(chunks, device)
        groups: dict[tuple[int, int], list[int]] = {}
        for position, i in enumerate(kept):
            left, top, right, bottom = self.boxes[i]
            groups.setdefault((bottom - top, right - left), []).append(position)
        parts, order = [], []
        for positions in groups.values():
            parts.append(self._resized_views(pictures, [kept[p] for p in positions], device))
            order += positions
        images = parts[0] if len(parts) == 1 else torch.cat(parts)
        if order != sorted(order):  # back to the batch's order (groups by crop size split it)
            inverse = torch.empty(len(order), dtype=torch.int64)
            inverse[order] = torch.arange(len(order))
            images = images.index_select(0, inverse.to(device, non_blocking=True))
        if len(kept) < len(self):
            labels = labels[kept]
        normalise_in_place(images, self.scale, self.shift)
        return images, labels.to(device, non_blocking=True)

    def _decode_each(
        self, chunks: list[torch.Tensor], device: torch.device
    ) -> tuple[list[torch.Tensor], list[int]]:
        pictures, kept, first = [], [], ""
        for i, chunk in enumerate(chunks):
            try:
                pictures.append(decode_jpegs([chunk], self.channels, device)[0])
            except RuntimeError as exc:
                first = first or f"{self.keys[i]}: {exc}"
                pictures.append(None)
                continue
            kept.append(i)
        if self.report_bad is not None:
            self.report_bad(len(chunks) - len(kept), first)
        if not kept:
            raise DataPipelineError(
                f"data.decode: no image of a batch of {len(chunks)} decodes on {device} "
                f"(first: {first})"
            )
        return pictures, kept

    def _resized_views(
        self, pictures: list[torch.Tensor], indices: list[int], device: torch.device
    ) -> torch.Tensor:
        """The views of images `indices` (all with one crop size), float32 [n, C, S, S]."""
        crops = []
        for i in indices:
            left, top, right, bottom = self.boxes[i]
            crops.append(pictures[i][:, top:bottom, left:right])
        views = torch.stack(crops).float()
        if views.shape[-2:] != (self.size, self.size):
            views = F.interpolate(
                views, size=(self.size, self.size), mode="bilinear", antialias=True
            )
            views = views.round_().clamp_(0.0, 255.0)
        flips = [self.flips[i] for i in indices]
        if any(flips):
            mask = torch.tensor(flips).to(device, non_blocking=True).view(-1, 1, 1, 1)
            views = torch.where(mask, views.flip(-1), views)
        return views
