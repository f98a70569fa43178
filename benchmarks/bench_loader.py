"""Crops per second: CropDataset (each TIFF decoded once, memory-mapped) against the naive
approach that reads the whole TIFF and recomputes the target for every crop, on the same 100
crops (equal work; both after a warm-up that leaves the files in the OS cache); then what
percentile normalisation and batch augmentation (configs/cpu.toml's settings) cost on top of
the plain loader, measured in the same run.

Run: python benchmarks/bench_loader.py
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from nf1prov.data.dataset import CropDataset
from nf1prov.data.layout import discover_fields
from nf1prov.data.semantic import instance_to_semantic
from nf1prov.data.synthetic import write_demo_dataset


class NaiveCrops:
    """Reads both TIFFs and converts the mask for every single crop."""

    def __init__(self, dataset: CropDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, i: int):
        field_index, z, y, x = (int(v) for v in self.dataset.samples[i])
        field, size = self.dataset.fields[field_index], self.dataset.crop_size
        stack = tifffile.imread(field.image_path)
        slices = self.dataset.windows[field_index][z]
        image = stack[slices, y:y + size, x:x + size].astype(np.float32) / 65535
        target = instance_to_semantic(tifffile.imread(field.mask_path), 2)
        return image, target[:, z, y:y + size, x:x + size].astype(np.float32)


def crops_per_second(get, indices) -> float:
    start = time.perf_counter()
    for i in indices:
        get(i)
    return len(indices) / (time.perf_counter() - start)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_demo_dataset(root, patients=2, sites=2, slices=9, height=512, width=512)
        fields = discover_fields(root)
        dataset = CropDataset(fields, 3, 128, 128, 2, cache_dir=Path(tmp) / "cache")
        indices = np.random.default_rng(0).permutation(len(dataset))[:100]
        for i in range(len(dataset)):  # first touch fills the cache (decode once), as epoch 1
            dataset[i]
        naive_crops = NaiveCrops(dataset)
        for i in indices[:4]:  # the naive reader's files in the OS cache too
            naive_crops[i]
        for i in indices[:10]:  # the same crops, the same values
            (ours_image, ours_target, _), (naive_image, naive_target) = dataset[i], naive_crops[i]
            np.testing.assert_allclose(ours_image.numpy(), naive_image, atol=1e-6)
            np.testing.assert_array_equal(ours_target.numpy(), naive_target)
        naive = crops_per_second(naive_crops.__getitem__, indices)
        ours = crops_per_second(dataset.__getitem__, indices)
        print(f"{len(fields)} stacks 9x512x512, the same {len(indices)} crops of 128x128, "
              "3 input slices")
        print(f"naive (read TIFF + convert mask per crop): {naive:10.1f} crops/s")
        print(f"CropDataset (decoded once, memory-mapped): {ours:10.1f} crops/s")
        print(f"speed-up: {ours / naive:.0f}x")

        # Percentile normalisation (slice ranges cached with the stack) and augmentation
        # (configs/cpu.toml's: drawn per epoch, applied as each crop is read) against the plain
        # dtype-max loader: batches of 8 through a DataLoader.
        import torch
        from torch.utils.data import DataLoader

        def batches_per_second(ds, repeats: int = 3) -> float:
            best = 0.0
            for epoch in range(1, repeats + 1):
                ds.set_epoch(epoch)
                loader = DataLoader(ds, batch_size=8, shuffle=True,
                                    generator=torch.Generator().manual_seed(0))
                start = time.perf_counter()
                n = sum(1 for _ in loader)
                best = max(best, n / (time.perf_counter() - start))
            return best

        def crops(normalisation: str, augment: dict | None = None) -> CropDataset:
            ds = CropDataset(fields, 3, 128, 128, 2, cache_dir=Path(tmp) / "cache",
                             normalisation=normalisation)
            if augment:
                ds.augment(augment, seed=0)
            return ds

        settings = {"flip": True, "rotate90": True, "intensity_scale": 0.2,
                    "intensity_offset": 0.1}
        plain = batches_per_second(crops("dtype_max"))
        normalised = batches_per_second(crops("percentile"))
        augmented = batches_per_second(crops("percentile", settings))
        print(f"\nbatches of 8 through a DataLoader (best of 3 epochs of {len(dataset)} crops):")
        print(f"dtype_max, no augmentation:              {plain:8.1f} batches/s")
        print(f"percentile normalisation:                {normalised:8.1f} batches/s "
              f"({normalised / plain:.2f}x)")
        print(f"percentile + flips/rotations/intensity:  {augmented:8.1f} batches/s "
              f"({augmented / plain:.2f}x of the plain loader)")

        # What that costs in training: one step of the UNet these batches feed (width 16, as
        # configs/cpu.toml), forward + backward + Adam, on the same 128-pixel batches of 8.
        from models.unet import UNet

        model = UNet(3, 3, 16)
        optimizer = torch.optim.Adam(model.parameters())
        x, y = torch.rand(8, 3, 128, 128), torch.rand(8, 3, 128, 128)
        steps = []
        for _ in range(4):
            start = time.perf_counter()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append(time.perf_counter() - start)
        step = min(steps[1:])
        extra = 1 / augmented - 1 / plain
        print(f"training step (UNet width 16, batch 8 x 3 x 128 x 128): {step * 1000:.0f} ms; "
              f"augmentation and percentile normalisation add {extra * 1000:.2f} ms per batch "
              f"= {extra / step:.1%} of a step")
