"""Images for the decoder benchmarks: generated photo-like ones, the colour photographs scikit-image ships,
or any folder of images (read as the converter reads them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# scikit-image's bundled colour photographs (skimage/data; its README names their sources and licences):
# real camera and microscope images of several sizes, no download needed.
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour gradients plus fine noise: decodes at a cost close to a real photo's."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(10, 60) + c) * np.cos(y / rng.uniform(10, 60) - c)
                     for c in range(3)], axis=-1)
    image = 127 + 90 * base + rng.normal(0, 18, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def generated(count: int, side: int, seed: int = 0) -> list[np.ndarray]:
    """Half square at `side`, half with one side shorter (0.6-1x), as the stored images of a converted set."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height = side if rng.random() < 0.5 else int(rng.integers(side * 0.6, side))
        width = side if height < side else int(rng.integers(side * 0.6, side))
        images.append(photo_like(rng, height, width))
    return images


def skimage_files() -> list[Path]:
    try:
        import skimage
    except ImportError as err:
        raise SystemExit("--images skimage needs scikit-image (pip install scikit-image; `make setup` "
                         "installs it), or pass a folder of images") from err
    folder = Path(skimage.__file__).parent / "data"
    missing = [name for name in SKIMAGE_PHOTOS if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"scikit-image {skimage.__version__} lacks {', '.join(missing)} in {folder}: "
                         "pass a folder of images instead")
    return [folder / name for name in SKIMAGE_PHOTOS]


def folder_files(path: str | Path) -> list[Path]:
    from fastpipe.data.images import IMAGE_EXTENSIONS

    root = Path(path)
    if not root.is_dir():
        raise SystemExit(f"--images {path}: no such folder (give 'generated', 'skimage' or a folder of images)")
    files = sorted(file for file in root.rglob("*") if file.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"--images {path}: no images in it (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


# Passes over a folder after the first: mirrored, upside down, both (then the same four again).
TURNS = ((slice(None), slice(None)), (slice(None), slice(None, None, -1)), (slice(None, None, -1), slice(None)),
         (slice(None, None, -1), slice(None, None, -1)))


def load(source: str, side: int, count: int) -> list[np.ndarray]:
    """`count` images stored at `side` px (the longest side, as `convert --max-resolution`): generated, or
    files cycled until there are `count`, each pass turned another way (TURNS)."""
    if source == "generated":
        return generated(count, side, seed=side)
    from convert.validate import load_image

    files = skimage_files() if source == "skimage" else folder_files(source)
    images = []
    for index in range(count):
        image = load_image(files[index % len(files)], max_resolution=side)
        images.append(np.ascontiguousarray(image[TURNS[(index // len(files)) % len(TURNS)]]))
    return images
