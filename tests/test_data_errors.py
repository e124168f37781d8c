"""Bad input to fastpipe.data gives a clear error before any decoding starts, never a crash or a hang."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from data_helpers import write_dataset

import fastpipe.data
from fastpipe.data import available_backends, build_loader
from fastpipe.data.beton import BetonError, write_json_atomic
from fastpipe.data.device import Normalizer, denormalize, resolve_device

FILE_BACKENDS = ["ffcv", "dali"]   # the backends that open betons


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("errors"), train=4, val=4)


@pytest.fixture
def copied(data_dir, tmp_path):
    """A private copy of the converted folder, free to damage."""
    return shutil.copytree(data_dir, tmp_path / "betons")


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep_fraction)])


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_truncated_beton_is_reported_with_the_fix(copied, backend):
    truncate(copied / "train.beton")
    with pytest.raises(BetonError, match=r"truncated.*python -m convert"):
        build_loader(backend, copied, "train", batch_size=2, resolution=32, workers=1)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_truncated_beton_is_caught_even_when_the_manifest_matches_it(copied, backend):
    truncate(copied / "train.beton")
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["splits"]["train"]["size_bytes"] = (copied / "train.beton").stat().st_size
    write_json_atomic(copied / "manifest.json", manifest)
    with pytest.raises(BetonError, match="corrupt header"):
        build_loader(backend, copied, "train", batch_size=2, resolution=32, workers=1)


@pytest.mark.parametrize("backend", ["ffcv", "dali", "torch"])
def test_missing_manifest_names_the_file_and_the_convert_command(tmp_path, backend):
    with pytest.raises(BetonError, match=r"manifest\.json.*python -m convert"):
        build_loader(backend, tmp_path, "train", batch_size=2, resolution=32, workers=1)


def test_missing_beton_names_the_file(copied):
    (copied / "val.beton").unlink()
    with pytest.raises(BetonError, match=r"val\.beton.*python -m convert"):
        build_loader("dali", copied, "val", batch_size=2, resolution=32, workers=1)


def test_torch_backend_without_the_source_images_says_to_use_a_beton_backend(copied, data_dir):
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["source_root"] = str(copied / "gone")
    write_json_atomic(copied / "manifest.json", manifest)
    with pytest.raises(BetonError, match="original images.*'ffcv' or 'dali'"):
        build_loader("torch", copied, "train", batch_size=2, resolution=32, workers=1)


@pytest.mark.parametrize("arguments, message", [
    ({"resolution": 8}, "resolution"), ({"resolution": 15}, "resolution"), ({"batch_size": 0}, "batch_size"),
    ({"workers": 0}, "workers"), ({"min_scale": 0}, "min_scale"), ({"ratio": (2.0, 1.0)}, "ratio"),
    ({"dtype": torch.int32}, "dtype"), ({"split": "test"}, "Split 'test'"),
])
def test_bad_arguments_are_rejected_by_name(data_dir, arguments, message):
    settings = {"split": "train", "batch_size": 2, "resolution": 32, "workers": 1, **arguments}
    with pytest.raises((ValueError, BetonError), match=message):
        build_loader("torch", data_dir, **settings)


def test_resolution_and_batch_size_setters_reject_bad_values(data_dir):
    loader = build_loader("dali", data_dir, "val", batch_size=2, resolution=32, workers=1)
    with pytest.raises(ValueError, match="resolution"):
        loader.set_resolution(8)
    with pytest.raises(ValueError, match="batch_size"):
        loader.set_batch_size(0)
    assert (loader.resolution, loader.batch_size) == (32, 2)


def test_distributed_without_a_process_group_says_how_to_start_one(data_dir):
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_loader("torch", data_dir, "train", batch_size=2, resolution=32, workers=1, distributed=True)


def test_unknown_backend_lists_the_choices(data_dir):
    with pytest.raises(ValueError, match=r"Unknown loader backend 'tfdata'.*dali.*ffcv.*torch"):
        build_loader("tfdata", data_dir)


def test_missing_library_names_it_and_the_backends_that_remain(data_dir, monkeypatch):
    monkeypatch.setattr(fastpipe.data, "_installed", lambda package: package != "nvidia.dali")
    assert "dali" not in available_backends()
    with pytest.raises(RuntimeError, match=r"nvidia.dali.*not installed.*\['ffcv', 'torch'\]"):
        build_loader("dali", data_dir)


def test_an_option_of_another_backend_is_rejected_with_the_valid_ones(data_dir):
    with pytest.raises(ValueError, match=r"\['order'\].*'dali'.*hw_decoder_load"):
        build_loader("dali", data_dir, order="random")


def test_ffcv_quasi_random_order_needs_os_cache_off(data_dir):
    with pytest.raises(ValueError, match="os_cache=False"):
        build_loader("ffcv", data_dir, order="quasi_random", os_cache=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
@pytest.mark.parametrize("backend", ["ffcv", "dali", "torch"])
def test_cuda_without_a_gpu_is_an_error_not_a_hang(data_dir, backend):
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        build_loader(backend, data_dir, "val", batch_size=2, resolution=32, workers=1, device="cuda")


def test_cpu_device_resolves_and_unknown_devices_are_rejected():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="Unsupported device"):
        resolve_device("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_normalizer_matches_imagenet_normalisation_and_keeps_channels_last(dtype):
    from torchvision.transforms import v2
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = Normalizer(torch.device("cpu"), dtype)(images)
    expected = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(images.float() / 255)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(denormalize(out), images.float(), atol=255 * tolerance, rtol=0)


def test_importing_fastpipe_data_loads_no_backend_library():
    import subprocess
    import sys
    code = ("import sys, fastpipe.data; "
            "print([m for m in ('ffcv', 'nvidia.dali', 'torchvision', 'numba') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_ffcv_loader_gives_memory_back_only_when_rss_grows(monkeypatch):
    from fastpipe.data import ffcv_backend

    readings, trims = iter([1000, 1020, 1100, 1000]), []
    monkeypatch.setattr(ffcv_backend, "resident_bytes", lambda: next(readings))
    monkeypatch.setattr(ffcv_backend, "release_freed_memory", lambda: trims.append(True))
    loader = ffcv_backend.FFCVLoader.__new__(ffcv_backend.FFCVLoader)   # only the memory policy is under test
    loader.bound_rss, loader.baseline_rss = True, None
    for _ in range(4):
        loader.bound_memory()
    assert loader.baseline_rss == 1000 and trims == [True]   # only the epoch 10% above the baseline
    loader.bound_rss = False
    loader.bound_memory()   # disabled: reads nothing (the iterator is exhausted, so a read would raise)


def test_a_forked_child_that_frees_an_inherited_dali_pipeline_does_not_hang(betons):
    """DataLoader workers fork from a process that may hold DALI pipelines; freeing one there waited on
    threads the child does not have, forever."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import gc, os, sys
        from fastpipe.data import build_loader
        loader = build_loader("dali", {str(betons)!r}, "train", batch_size=8, resolution=32, workers=1)
        for _ in loader:
            pass
        gc.disable()
        cycle = [loader]
        cycle.append(cycle)   # unreachable garbage at fork time, as a loader freed by the cycle collector
        del loader, cycle
        pid = os.fork()
        if pid == 0:
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
