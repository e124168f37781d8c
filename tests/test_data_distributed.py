"""Two gloo processes: each backend's shards cover the data set once, without overlap."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from data_helpers import write_dataset

# torch shards with the same LoaderBase.epoch_order as dali (checked equal in test_data_loaders);
# left out here to keep the spawned processes short
BACKENDS = ["ffcv", "dali"]
SAMPLES, WORLD = 16, 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_shards(rank: int, data: str, port: int, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_loaders import sample_ids

    from fastpipe.data import build_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        seen = {}
        for backend in BACKENDS:
            loader = build_loader(backend, data, "train", batch_size=3, resolution=32, workers=1, shuffle=True,
                                  drop_last=False, normalize=False, seed=1, distributed=True)
            seen[backend] = {"len": len(loader)}
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                seen[backend][epoch] = sample_ids(torch.cat([images.clone() for images, _ in loader]))
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    data = write_dataset(base, train=SAMPLES, val=2)
    mp.spawn(read_shards, args=(str(data), free_port(), str(base)), nprocs=WORLD, join=True)
    return [json.loads((base / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_cover_the_data_set_once_without_overlap(shards, backend):
    for epoch in ("0", "1"):
        first, second = (rank[backend][epoch] for rank in shards)
        assert len(first) == len(second) == SAMPLES // WORLD
        assert sorted(first + second) == list(range(SAMPLES))
    assert shards[0][backend]["len"] == 3   # 8 samples per rank in batches of 3, last one kept
    assert shards[0][backend]["0"] != shards[0][backend]["1"]   # reshuffled per epoch


def test_all_backends_give_each_rank_the_same_shard(shards):
    for rank in shards:
        assert rank["ffcv"]["0"] == rank["dali"]["0"]
