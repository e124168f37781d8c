"""FFCV decoders of our own: the random-resized crop and flip of FFCV's stock decoder, drawn from a
generator seeded by (seed, epoch, sample index), and, with the native crop decoder (crop_decode.py), a
decode of only the crop's window at a DCT scale that fits the output, then a cheap resize.

FFCV 1.0.2 draws crops from numba's per-thread generators, which nobody seeds, so no two runs crop alike.
Here each sample reseeds its thread's generator first. The epoch reaches the compiled code through
the reader's metadata table, which FFCV passes to the decoder on every call: `add_epoch_column` gives the
image field an `epoch` column that the loader sets before each epoch.
"""
from __future__ import annotations

import numpy as np
from ffcv.fields.rgb_image import (
    IMAGE_MODES,
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
    ResizedCropRGBImageDecoder,
    get_center_crop,
    get_random_crop,
)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from fastpipe.data import crop_decode
from fastpipe.data.seeding import sample_seed


def add_epoch_column(loader, field_name: str) -> np.ndarray:
    """Replace the FFCV loader's metadata table by a copy whose `field_name` entries have an `epoch`
    column; returns that column (a view: assign to it before each epoch)."""
    reader = loader.reader
    key = f"f{loader.field_name_to_f_ix[field_name]}"
    old = reader.metadata
    # uint16, in a packed copy (FFCV's own table pads each row to 8 bytes): 23 bytes a sample against FFCV's
    # 24 (a uint64 epoch would make it 29). Epochs run 0..ffcv_backend.MAX_EPOCH.
    layout = [(name, np.dtype(old.dtype[name].descr + [("epoch", "<u2")]) if name == key else old.dtype[name])
              for name in old.dtype.names]
    table = np.zeros(len(old), dtype=layout)
    for name in old.dtype.names:
        if name == key:
            for column in old.dtype[name].names:
                table[name][column] = old[name][column]
        else:
            table[name] = old[name]
    reader.metadata = table   # read by every later epoch iterator; the code compiles at first use
    # FFCV's graph and its operations (accept_globals) keep views of the old table: point them at the new one,
    # so that the old table (~30 bytes a sample) is freed rather than kept beside its copy.
    loader.graph.metadata = table
    views = {old[name].__array_interface__["data"][0]: name for name in old.dtype.names}
    for operation in loader.graph.operation_to_node:
        held = getattr(operation, "metadata", None)
        if isinstance(held, np.ndarray) and held.base is not None:
            name = views.get(held.__array_interface__["data"][0])
            if name is not None and held.dtype == old.dtype[name]:
                operation.metadata = table[name]
    return table[key]["epoch"]


def declare_output_only(decoder, previous_state):
    """The native decoder needs no full-image buffer per batch slot (FFCV's stock one allocates
    max height x max width x 3 each): keep the output, shrink the scratch buffer to one byte."""
    state, (output, _) = ResizedCropRGBImageDecoder.declare_state_and_memory(decoder, previous_state)
    return state, (output, AllocationQuery((1,), np.dtype("<u1")))


def native_decoder(jpg, mem_read):
    """numba code that writes one sample's crop, resized and maybe mirrored, into `out`."""
    decode_crop_c = Compiler.compile(crop_decode.decode_crop)
    crop_resize_c = Compiler.compile(crop_decode.crop_resize)
    max_denom = crop_decode.MAX_DENOM

    def decode_one(field, storage_state, top, left, crop_h, crop_w, out, mirror):
        image_data = mem_read(field["data_ptr"], storage_state)
        height, width = np.uint32(field["height"]), np.uint32(field["width"])
        if field["mode"] == jpg:
            decode_crop_c(image_data, height, width, top, left, crop_h, crop_w, out, mirror, max_denom)
        else:
            crop_resize_c(image_data.reshape(height, width, 3), top, left, crop_h, crop_w, out, mirror)

    return Compiler.compile(decode_one)


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCropRGBImageDecoder (same crop distribution) plus an optional horizontal flip,
    both a function of (seed, epoch, sample index). Needs the `epoch` column of `add_epoch_column`.
    native=True decodes through crop_decode (same crops and flips, cheaper decode and resize)."""

    def __init__(self, output_size, scale, ratio, *, seed: int, flip: bool, native: bool = False):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed, self.flip, self.native = int(seed), bool(flip), bool(native)

    def declare_state_and_memory(self, previous_state):
        if self.native:
            return declare_output_only(self, previous_state)
        return super().declare_state_and_memory(previous_state)

    def generate_code(self):
        if self.native:
            return self.generate_native_code()
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_c = Compiler.compile(get_random_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        seed, flip = self.seed, self.flip

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                np.random.seed(sample_seed(seed, field["epoch"], source_ix))   # this thread's generator
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    pixels = temp_storage[dst_ix]
                    imdecode_c(image_data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                    pixels = pixels.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    pixels = image_data.reshape(height, width, 3)
                top, left, crop_h, crop_w = crop_c(height, width, scale, ratio)
                out = destination[dst_ix]
                resize_crop_c(pixels, top, top + crop_h, left, left + crop_w, out)
                if flip and np.random.random() < 0.5:
                    columns = out.shape[1]
                    for x in range(columns // 2):   # mirror in place, column pairs
                        for y in range(out.shape[0]):
                            for c in range(3):
                                out[y, x, c], out[y, columns - 1 - x, c] = out[y, columns - 1 - x, c], out[y, x, c]
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

    def generate_native_code(self):
        my_range = Compiler.get_iterator()
        decode_one = native_decoder(IMAGE_MODES["jpg"], self.memory_read)
        crop_c = Compiler.compile(get_random_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        seed, flip = self.seed, self.flip

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination = my_storage[0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                np.random.seed(sample_seed(seed, field["epoch"], source_ix))   # draws as in the stock path
                top, left, crop_h, crop_w = crop_c(np.uint32(field["height"]), np.uint32(field["width"]),
                                                   scale, ratio)
                mirror = 1 if flip and np.random.random() < 0.5 else 0
                decode_one(field, storage_state, top, left, crop_h, crop_w, destination[dst_ix], mirror)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class NativeCenterCrop(CenterCropRGBImageDecoder):
    """FFCV's CenterCropRGBImageDecoder (same window) through the native crop decoder."""

    def declare_state_and_memory(self, previous_state):
        return declare_output_only(self, previous_state)

    def generate_code(self):
        my_range = Compiler.get_iterator()
        decode_one = native_decoder(IMAGE_MODES["jpg"], self.memory_read)
        crop_c = Compiler.compile(get_center_crop)
        ratio = self.ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination = my_storage[0]
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                top, left, crop_h, crop_w = crop_c(np.uint32(field["height"]), np.uint32(field["width"]),
                                                   None, ratio)
                decode_one(field, storage_state, top, left, crop_h, crop_w, destination[dst_ix], 0)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
