"""Builds the optional native crop decoder, fastpipe/data/_cropdecode.cpp, against the system libjpeg
(libjpeg-turbo) and OpenCV. Everything else about the package lives in pyproject.toml. Without the headers
(`make sysdeps` installs them) the build is skipped and the FFCV loader uses FFCV's stock decoder."""
import subprocess

from setuptools import Extension, setup


def include_dirs() -> list[str]:
    try:
        flags = subprocess.run(["pkg-config", "--cflags-only-I", "opencv4", "libjpeg"], check=True,
                               capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        flags = ["-I/usr/include/opencv4"]
    return [flag[2:] for flag in flags]


setup(ext_modules=[Extension(
    "fastpipe.data._cropdecode", ["fastpipe/data/_cropdecode.cpp"], language="c++",
    include_dirs=include_dirs(), libraries=["jpeg", "opencv_imgproc", "opencv_core"],
    extra_compile_args=["-O3", "-std=c++17"], optional=True)])
