"""Behaviour every loader backend (ffcv, dali, torch) must share.

Sample identity is read from the pixels of `coded_dir` (each image's red channel encodes its index,
see data_helpers); everything else runs on the shared converter output `betons` (train stored half
JPEG / half raw pixels, val raw).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from data_helpers import write_dataset

from fastpipe.data import build_loader
from fastpipe.data.beton import BetonSamples, read_manifest
from fastpipe.data.device import IMAGENET_MEAN, IMAGENET_STD, denormalize
from fastpipe.data.sample_table import split_samples

BACKENDS = ["ffcv", "dali", "torch"]
TRAIN, VAL, BATCH, RES = 24, 18, 8, 32
KEEP_ALIVE = []


def make_loader(backend, *args, **kwargs):
    loader = build_loader(backend, *args, **kwargs)
    # numba (0.68) can raise a KeyError in the finaliser of FFCV's compiled functions when a loader
    # is freed mid-session (ignored by Python, reported by pytest); keeping them avoids the noise.
    KEEP_ALIVE.append(loader)
    return loader


@pytest.fixture(scope="session")
def coded_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("coded"), train=TRAIN, val=VAL, write_mode="jpg")


@pytest.fixture(scope="session")
def mixed_dir(tmp_path_factory):
    """Index-coded betons storing about half the images as raw pixels (write mode 'proportion')."""
    return write_dataset(tmp_path_factory.mktemp("mixed"), train=4, val=12, write_mode="proportion")


@pytest.fixture(scope="module")
def val_loaders(coded_dir):
    return {name: make_loader(name, coded_dir, "val", batch_size=BATCH, resolution=RES, workers=2,
                              shuffle=False, drop_last=False, normalize=False) for name in BACKENDS}


@pytest.fixture(scope="module")
def train_loaders(betons):
    return {name: make_loader(name, betons, "train", batch_size=BATCH * 2, resolution=RES, workers=2,
                              shuffle=True, drop_last=True, normalize=True, seed=7) for name in BACKENDS}


def run_epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    batches = [(images.clone(), labels.clone()) for images, labels in loader]
    return [b[0] for b in batches], [b[1] for b in batches]


def sample_ids(images: torch.Tensor, offset: int = 0) -> list[int]:
    """Recover each image's sample index from its red channel (6 * index, see data_helpers)."""
    pixels = images.float() if images.dtype == torch.uint8 else denormalize(images)
    red = pixels[:, 0].flatten(1).median(dim=1).values
    return [int(v) - offset for v in torch.round(red / 6)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_epoch_yields_every_sample_once_in_manifest_order(val_loaders, coded_dir, backend):
    loader = val_loaders[backend]
    images, labels = run_epoch(loader)
    assert len(loader) == len(images) == 3   # 18 samples, batch 8, last batch kept
    assert [len(b) for b in labels] == [8, 8, 2]
    batch = images[0]
    assert batch.shape == (BATCH, 3, RES, RES) and batch.dtype == torch.uint8
    assert batch.is_contiguous(memory_format=torch.channels_last)
    all_images, all_labels = torch.cat(images), torch.cat(labels)
    assert all_labels.dtype == torch.int64
    expected = [label for _, label in split_samples(coded_dir, "val")]
    assert all_labels.tolist() == expected
    assert sample_ids(all_images, offset=TRAIN) == list(range(VAL))
    assert loader.num_samples == VAL and loader.backend == backend and len(loader.classes) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_are_normalised_float_channels_last(train_loaders, betons, backend):
    loader = train_loaders[backend]
    images, labels = run_epoch(loader, epoch=0)
    samples = read_manifest(betons)["splits"]["train"]["written"]
    assert len(loader) == len(images) == samples // (2 * BATCH)
    for batch, batch_labels in zip(images, labels):
        assert batch.shape == (2 * BATCH, 3, RES, RES) and batch.dtype == torch.float32
        assert batch.is_contiguous(memory_format=torch.channels_last)
        assert batch_labels.shape == (2 * BATCH,) and batch_labels.dtype == torch.int64
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    stacked = torch.cat(images)
    assert low - 1e-4 <= stacked.min() and stacked.max() <= high + 1e-4
    assert stacked.std() > 0.1   # not a constant batch
    assert set(torch.cat(labels).tolist()) == set(range(len(loader.classes)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_order_repeats_for_an_epoch_and_changes_with_the_next(train_loaders, backend):
    loader = train_loaders[backend]
    first = torch.cat(run_epoch(loader, epoch=3)[1]).tolist()
    again = torch.cat(run_epoch(loader, epoch=3)[1]).tolist()
    other = torch.cat(run_epoch(loader, epoch=4)[1]).tolist()
    assert first == again and other != first


def test_backends_read_the_same_train_order_for_the_same_seed_and_epoch(train_loaders):
    orders = {name: torch.cat(run_epoch(loader, epoch=5)[1]).tolist() for name, loader in train_loaders.items()}
    assert orders["ffcv"] == orders["dali"] == orders["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shuffled_epoch_is_a_permutation_of_the_samples(coded_dir, backend):
    loader = make_loader(backend, coded_dir, "train", batch_size=BATCH, resolution=RES, workers=1,
                         shuffle=True, drop_last=True, normalize=False, seed=3)
    first, second = (sample_ids(torch.cat(run_epoch(loader, epoch)[0])) for epoch in (0, 1))
    assert sorted(first) == sorted(second) == list(range(TRAIN))   # 24 = 3 whole batches
    assert first != second


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolution_and_batch_size_change_from_the_next_epoch(val_loaders, backend):
    loader = val_loaders[backend]
    try:
        shapes = []
        for images, _ in loader:
            shapes.append(tuple(images.shape))
            loader.set_resolution(48)   # mid-epoch: the running epoch keeps its size
            loader.set_batch_size(5)
        assert shapes == [(BATCH, 3, RES, RES)] * 2 + [(2, 3, RES, RES)]
        images, _ = run_epoch(loader)
        assert [tuple(b.shape) for b in images] == [(5, 3, 48, 48)] * 3 + [(3, 3, 48, 48)]
        assert len(loader) == 4
        assert sample_ids(torch.cat(images), offset=TRAIN) == list(range(VAL))
    finally:
        loader.set_resolution(RES)
        loader.set_batch_size(BATCH)
    assert run_epoch(loader)[0][0].shape == (BATCH, 3, RES, RES)


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_stopping_an_epoch_early_leaves_the_next_one_whole(val_loaders, backend):
    loader = val_loaders[backend]
    threads = threading.active_count()
    for _ in range(3):
        for _ in zip(range(1), loader):   # take one batch, then abandon the epoch
            pass
    images, _ = run_epoch(loader)
    assert sample_ids(torch.cat(images), offset=TRAIN) == list(range(VAL))
    assert threading.active_count() <= threads + 1


@pytest.mark.parametrize("directory, split", [("mixed_dir", "val"), ("betons", "val")])
def test_ffcv_and_dali_decode_the_same_val_pixels(request, directory, split):
    data = request.getfixturevalue(directory)
    outputs = {}
    for backend in ("ffcv", "dali"):
        loader = make_loader(backend, data, split, batch_size=5, resolution=RES, workers=2,
                             shuffle=False, drop_last=False, normalize=False)
        images, labels = run_epoch(loader)
        outputs[backend] = torch.cat(images).float(), torch.cat(labels)
    (ffcv_images, ffcv_labels), (dali_images, dali_labels) = outputs["ffcv"], outputs["dali"]
    assert torch.equal(ffcv_labels, dali_labels)
    assert len(ffcv_labels) == read_manifest(data)["splits"][split]["written"]
    difference = (ffcv_images - dali_images).abs()
    # same crop window, different resize kernels (the crop decoder's bilinear under 2x shrink, box halving
    # beyond, vs DALI's antialiased linear): close, not equal. Sharp synthetic edges make single images
    # differ by up to ~12 levels, yet each FFCV image is still nearest to its own DALI image.
    assert difference.mean() < 4
    pairwise = torch.cdist(ffcv_images.flatten(1), dali_images.flatten(1), p=1)
    assert torch.equal(pairwise.argmin(dim=1), torch.arange(len(ffcv_images)))


def test_raw_pixel_samples_read_back_exactly(mixed_dir):
    from PIL import Image
    manifest = read_manifest(mixed_dir)
    samples = BetonSamples(mixed_dir / "val.beton")
    raw = [i for i in range(len(samples)) if samples.is_raw(i)]
    assert raw and len(raw) < len(samples)   # a mixed beton, or this test proves nothing
    for i in raw:
        pixels = samples.encoded(i).reshape(samples.height[i], samples.width[i], 3)
        original = np.asarray(Image.open(manifest["source_root"] + "/" + split_samples(mixed_dir, "val")[i][0]))
        assert np.array_equal(pixels, original)


def test_beton_samples_agree_with_ffcv_reader(betons):
    from ffcv.reader import Reader
    path = betons / "train.beton"
    ours, theirs = BetonSamples(path), Reader(str(path))
    assert 0 < ours.mode.sum() < len(ours)   # both JPEG and raw samples
    assert len(ours) == theirs.num_samples
    assert np.array_equal(ours.labels, theirs.metadata["f1"])
    assert np.array_equal(ours.mode, theirs.metadata["f0"]["mode"])
    assert np.array_equal(ours.offset, theirs.metadata["f0"]["data_ptr"].astype(np.int64))
    sizes = dict(zip(theirs.alloc_table["ptr"].tolist(), theirs.alloc_table["size"].tolist()))
    assert ours.size.tolist() == [sizes[int(p)] for p in ours.offset]


def test_sample_order_shards_pad_like_distributed_sampler_and_cover_everything():
    from fastpipe.data.base import sample_order
    shards = [sample_order(10, True, seed=0, epoch=2, rank=rank, world_size=3) for rank in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 4]   # ceil(10 / 3), padded with repeats
    assert set(np.concatenate(shards).tolist()) == set(range(10))
    assert sorted(sample_order(10, True, seed=0, epoch=2)) == list(range(10))
    assert sample_order(10, False, seed=0, epoch=2).tolist() == list(range(10))
    single = sample_order(10, True, seed=0, epoch=2, distributed=True)   # torchrun with one process
    assert sorted(single) == list(range(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_augmentation_is_a_function_of_seed_epoch_and_sample(betons, backend):
    def epoch_pixels(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([images.clone() for images, _ in loader])

    options = {"batch_size": BATCH, "resolution": RES, "workers": 2, "shuffle": False, "drop_last": True,
               "normalize": False, "seed": 3}
    fresh = make_loader(backend, betons, "train", **options)
    wanted = epoch_pixels(fresh, 1)
    assert not torch.equal(wanted, epoch_pixels(fresh, 2))   # another epoch, other crops and flips
    # a loader with another history (an epoch stopped after one batch) draws the same for epoch 1
    other = make_loader(backend, betons, "train", **options)
    other.set_epoch(0)
    next(iter(other))
    assert torch.equal(epoch_pixels(other, 1), wanted)
    reseeded = make_loader(backend, betons, "train", **{**options, "seed": 4})
    assert not torch.equal(epoch_pixels(reseeded, 1), wanted)


def test_dali_is_fed_views_of_the_beton_with_raw_samples_as_pixels_not_ppm(mixed_dir):
    from fastpipe.data.dali_backend import BetonSource, FeedColumns

    samples = BetonSamples(mixed_dir / "val.beton")
    columns = FeedColumns(samples)
    source = BetonSource(columns, batch_size=len(samples), train=False)
    encoded, meta, windows = source.batch(np.arange(len(samples)), epoch=0)
    meta, windows = np.array(meta.as_tensor()), np.array(windows.as_tensor())
    shapes, is_raw, labels = meta[:, :3], meta[:, 3].astype(bool), meta[:, 4]
    base = columns.data.ctypes.data
    for index in range(len(samples)):
        sample = encoded[index]
        assert sample.data_ptr() == base + int(samples.offset[index])   # the map itself: no copy anywhere
        data = np.array(sample)
        if is_raw[index]:
            assert data.size == int(np.prod(shapes[index])) == samples.width[index] * samples.height[index] * 3
        else:
            assert bytes(data[:3]) == b"\xff\xd8\xff"   # JPEG bytes, as stored
    assert is_raw.any() and not is_raw.all()
    assert labels.tolist() == samples.labels.tolist() and windows.shape == (len(samples), 4)
    assert (meta[:, 5] == 0).all()   # val: no mirror


def test_the_loader_benchmark_reports_the_dali_feed_cost(mixed_dir, tmp_path):
    import json

    from benchmarks.__main__ import main

    out = tmp_path / "loaders"
    assert main(["loaders", "--data", str(mixed_dir), "--backends", "dali", "--res", "32", "--workers", "1",
                 "--batch-size", "4", "--epochs", "1", "--warmup", "0", "--no-isolate", "--out", str(out)]) == 0
    rows = {row["backend"]: row for row in json.loads((out / "results.json").read_text())["results"]}
    assert rows["dali"]["feed_us_per_sample"] > 0 and rows["torch"]["feed_us_per_sample"] is None
    assert "feed µs/img" in (out / "results.md").read_text()


def test_dali_runs_on_into_the_next_epoch_with_the_batches_a_fresh_loader_makes(betons):
    """The train stream does not stop at an epoch's end: the next epoch's batches are decoded meanwhile. They are
    the ones a loader starting at that epoch gives, and an epoch other than the next one gets a fresh pipeline."""
    options = {"batch_size": BATCH, "resolution": RES, "workers": 2, "shuffle": True, "drop_last": True,
               "normalize": False, "seed": 5}

    def epoch_pixels(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([images.clone() for images, _ in loader])

    running = make_loader("dali", betons, "train", **options)
    epoch_pixels(running, 1)
    runner = running.runners[(RES, BATCH)]
    assert runner.next_epoch == 2 and runner.source.thread.is_alive()   # already feeding epoch 2
    continued = epoch_pixels(running, 2)
    assert running.runners[(RES, BATCH)] is runner   # the same pipeline went on
    assert torch.equal(continued, epoch_pixels(make_loader("dali", betons, "train", **options), 2))
    skipped = epoch_pixels(running, 5)   # not the epoch the stream is on: rebuilt, still right
    assert running.runners[(RES, BATCH)] is not runner
    assert torch.equal(skipped, epoch_pixels(make_loader("dali", betons, "train", **options), 5))


def test_dali_draws_ffcv_s_crop_windows(mixed_dir):
    """Raw-pixel samples, cropped by DALI with the windows of `random_crop_windows` (FFCV's rule and seeding),
    match FFCV's stock decoder on the same samples (the same crop; resize kernels differ a little)."""
    from fastpipe.data.crops import random_crop_windows

    samples = BetonSamples(mixed_dir / "train.beton")
    options = {"batch_size": 2, "resolution": RES, "workers": 1, "shuffle": False, "drop_last": True,
               "normalize": False, "seed": 11, "flip": False, "min_scale": 0.25}
    images = {}
    for backend, extra in (("dali", {}), ("ffcv", {"decoder": "stock"})):
        loader = make_loader(backend, mixed_dir, "train", **options, **extra)
        loader.set_epoch(3)
        images[backend] = torch.cat([batch.clone() for batch, _ in loader]).float()
    windows, _ = random_crop_windows(11, 3, np.arange(len(samples)), samples.height.astype(np.int64),
                                     samples.width.astype(np.int64), (0.25, 1.0), (3 / 4, 4 / 3), False)
    assert len(set(map(tuple, windows.tolist()))) == len(windows)   # different windows per sample
    difference = (images["ffcv"] - images["dali"]).abs().flatten(1).mean(dim=1)
    assert difference.max() < 1   # same windows (another seed differs by 2-17 levels per image here)


def test_ffcv_loaders_skip_the_per_sample_dicts_they_do_not_read(betons):
    """FFCV's memory manager built sample -> pages, page -> samples and pointer -> size dicts in every process
    (~450 MB at 1.28M samples); reading from the page cache needs none of them, so they are built only if asked."""
    from ffcv.reader import Reader

    from fastpipe.data.ffcv_backend import LeanOSCacheManager

    loader = make_loader("ffcv", betons, "train", batch_size=BATCH, resolution=RES, workers=1)
    manager, reader = loader.loader.memory_manager, loader.loader.reader
    assert isinstance(manager, LeanOSCacheManager) and "sample_to_pages" not in vars(manager)
    # the allocation table is read once into the sorted pointer and size columns, then dropped
    stock = Reader(str(betons / "train.beton"))
    assert reader.alloc_table is None
    order = np.argsort(stock.alloc_table["ptr"])
    assert (manager.ptrs == stock.alloc_table["ptr"][order]).all() and (manager.sizes == stock.alloc_table["size"][order]).all()
    # the metadata table with its epoch column is no bigger than FFCV's own, and nothing keeps FFCV's beside it
    assert reader.metadata.itemsize <= stock.metadata.itemsize   # packed: 23 bytes against 24
    for operation in loader.loader.graph.operation_to_node:
        held = getattr(operation, "metadata", None)
        if isinstance(held, np.ndarray):
            assert np.shares_memory(held, reader.metadata)
    assert loader.loader.graph.metadata is reader.metadata
    next(iter(loader))
    assert "sample_to_pages" not in vars(manager)
    assert sum(len(pages) for pages in manager.sample_to_pages.values()) >= loader.num_samples   # still there on demand


def test_an_abandoned_ffcv_epoch_ends_its_thread_even_after_the_last_batch(betons, monkeypatch):
    """FFCV's epoch thread puts its end marker without a timeout: abandoned once it has made every batch
    (two batches, a queue of one), it would wait forever for a reader unless the loader drains it."""
    import threading

    from fastpipe.data import ffcv_backend

    monkeypatch.setattr(ffcv_backend.finish_thread, "__defaults__", (30.0,))
    loader = make_loader("ffcv", betons, "val", batch_size=BATCH, resolution=RES, workers=1, batches_ahead=1)
    loader.batch_size = -(-loader.num_samples // 2)   # two batches
    epoch = loader.run_epoch(0)
    next(epoch)
    time.sleep(1)   # time for the thread to make the second batch and block on the end marker
    epoch.close()
    assert not [thread for thread in threading.enumerate() if type(thread).__name__ == "EpochIterator"]


def test_an_ffcv_epoch_left_open_while_a_later_one_starts_fails_rather_than_change_its_crops(betons):
    """The crops of every FFCV epoch thread come from one epoch column: the later epoch finishes the earlier
    one, which then says so instead of going on with the later epoch's crops."""
    import threading

    loader = make_loader("ffcv", betons, "train", batch_size=BATCH, resolution=RES, workers=1)
    fresh = make_loader("ffcv", betons, "train", batch_size=BATCH, resolution=RES, workers=1)
    first, second = loader.run_epoch(0), loader.run_epoch(1)
    next(first)
    later = [images.clone() for images, _ in [next(second)]]
    with pytest.raises(RuntimeError, match="epoch 0 was left open while a later one started"):
        next(first)
    rest = [images.clone() for images, _ in second]
    expected = [images.clone() for images, _ in fresh.run_epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(later + rest, expected, strict=True))   # epoch 1 as it should be
    assert not [thread for thread in threading.enumerate() if type(thread).__name__ == "EpochIterator"]


def test_a_dropped_dali_train_loader_takes_its_feeding_thread_and_pipeline_with_it(betons):
    """A train loader's endless stream (drop_last) refers to the loader weakly: dropped after a few batches
    (as the autotuner does with each trial), it is freed and its feeding thread ends."""
    import gc
    import weakref

    for _ in range(2):
        loader = build_loader("dali", betons, "train", batch_size=BATCH, resolution=RES, workers=1, drop_last=True)
        for _, _batch in zip(range(2), loader):
            pass
        gone, feeding = weakref.ref(loader), [runner.source.thread for runner in loader.runners.values()]
        assert feeding and all(thread.is_alive() for thread in feeding)   # on into the next epoch's batches
        del loader, _batch
        gc.collect()
        for thread in feeding:
            thread.join(timeout=10)
        assert gone() is None and not any(thread.is_alive() for thread in feeding)


def test_an_abandoned_dali_feed_stops_even_when_its_queue_is_full(mixed_dir):
    """The feeding thread may be handing over the epoch's end while nobody reads any more: stop() must not
    wait for a reader forever."""
    from fastpipe.data.dali_backend import BetonSource, FeedColumns

    samples = BetonSamples(mixed_dir / "val.beton")
    source = BetonSource(FeedColumns(samples), batch_size=len(samples) // 2, train=False, ahead=1)
    source.order = np.arange(2 * (len(samples) // 2))   # two batches, a queue of one
    batches = iter(source)
    next(batches)   # the second batch fills the queue; the end waits behind it
    time.sleep(0.5)   # time for the thread to get there (were it slower, the check below would only be weaker)
    batches.close()   # abandoned
    stopper = threading.Thread(target=source.stop)
    stopper.start()
    stopper.join(timeout=30)
    assert not stopper.is_alive() and source.thread is None
