"""Images and video frames -> the vision encoder's ``pixel_values [N, 3*2*16*16]`` and ``grid_thw``, equal to the
reference processors (transformers' ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` as the Qwen3-Omni
processor configures them, torchvision backend on the CPU).

Steps: ``smart_resize`` to multiples of ``patch * merge`` = 32 pixels within [min_pixels, max_pixels] -> bicubic
resize with antialiasing (torch's native uint8 kernel for uint8 input, exactly what torchvision runs on the CPU;
fp32/fp64 input is resized unrounded) -> ``(x - 255 mean) / (255 std)`` in fp32 -> patches of (3, 2, 16, 16) in
2x2-merge-block order. An image is one frame repeated to the temporal patch of 2; a video's frame count is padded to
a multiple of 2 with its last frame.

Pixel values are on the 0..255 scale for float input too: the reference rescales every input by 1/255.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PATCH_SIZE, TEMPORAL_PATCH_SIZE, MERGE_SIZE = 16, 2, 2
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)             # the release's preprocessor_config.json
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 3136, 12845056   # the release's preprocessor_config.json
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 32 * 32, 768 * 32 * 32   # fixed by the Qwen3-Omni processor for videos
RESCALE_FACTOR = 1 / 255
MAX_ASPECT_RATIO = 200


def preprocessor_kwargs(folder: str | Path) -> dict[str, Any]:
    """Image settings from a checkpoint's ``preprocessor_config.json`` (empty when it has none), as keyword
    arguments of :func:`preprocess_image`. Video pixel bounds are not taken from it: the reference processor
    overrides them with ``VIDEO_MIN_PIXELS``/``VIDEO_MAX_PIXELS``."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    size = d.get("size") or {}
    found = dict(min_pixels=d.get("min_pixels") or size.get("shortest_edge"),
                 max_pixels=d.get("max_pixels") or size.get("longest_edge"), patch_size=d.get("patch_size"),
                 temporal_patch_size=d.get("temporal_patch_size"), merge_size=d.get("merge_size"),
                 mean=d.get("image_mean"), std=d.get("image_std"))
    return {key: tuple(v) if isinstance(v, list) else v for key, v in found.items() if v is not None}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The reference's target size: multiples of ``factor`` near the input's, area within the bounds, same aspect."""
    if height < 1 or width < 1:
        raise ValueError(f"image of {height}x{width} pixels is empty: it needs at least 1x1 pixel")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {height}x{width} pixels: aspect ratio {ratio:.1f} is above the "
                         f"{MAX_ASPECT_RATIO} the processor accepts")
    if not 1 <= min_pixels <= max_pixels:
        raise ValueError(f"pixel bounds must satisfy 1 <= min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor   # round half to even, as Python
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(
    image: Any,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    *,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """image: [H, W, 3] (or [H, W] grey) uint8 or float array/tensor on the 0..255 scale, a PIL image or a path ->
    (pixel_values fp32 [h * w, 3 * temporal_patch_size * patch_size**2], grid_thw [1, 3] = [[1, h, w]] in patches)."""
    frames = _image_to_chw(image)[None]                                                    # [1, 3, H, W]
    frames = _resize(frames, patch_size * merge_size, min_pixels, max_pixels)
    return _patchify(_normalize(frames, mean, std), patch_size, temporal_patch_size, merge_size)


def preprocess_video(
    frames: Any,
    fps: float = 1.0,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    *,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """frames: [T, H, W, 3] uint8 or float on the 0..255 scale, all already sampled at ``fps`` frames per second ->
    (pixel_values fp32 [t * h * w, P], grid_thw [[t, h, w]] with t = ceil(T / temporal_patch_size),
    second_per_grid = temporal_patch_size / fps: the seconds one temporal patch spans, for the thinker's positions)."""
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    video = _as_tensor(frames, "video frames")
    if video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError(f"video frames must be [T, H, W, 3] (RGB, channels last), got {tuple(video.shape)}")
    if video.shape[0] == 0:
        raise ValueError("video has no frames")
    video = _resize(video.permute(0, 3, 1, 2).contiguous(), patch_size * merge_size, min_pixels, max_pixels)
    pixels, grid = _patchify(_normalize(video, mean, std), patch_size, temporal_patch_size, merge_size)
    return pixels, grid, temporal_patch_size / fps


# ---- steps ----

def _as_tensor(array: Any, what: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    if not torch.is_tensor(tensor):
        raise ValueError(f"{what} must be a numpy array or a torch tensor, got {type(array).__name__}")
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise ValueError(f"{what} must be uint8 or floating point (0..255 scale), got {tensor.dtype}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contain NaN or Inf" if what.endswith("s") else f"{what} contains NaN or Inf")
    return tensor.cpu()


def _image_to_chw(image: Any) -> torch.Tensor:
    """Any accepted image -> [3, H, W] contiguous, dtype kept."""
    if isinstance(image, (str, Path)):
        image = _open_image(Path(image))
    if _is_pil_image(image):
        try:
            image = _pil_to_rgb_array(image)
        except (OSError, SyntaxError) as e:    # a lazily opened PIL image whose file is truncated or corrupt
            raise ValueError(f"cannot decode the PIL image: {e}") from e
    tensor = _as_tensor(image, "image")
    if tensor.dim() == 3 and tensor.shape[-1] == 1:
        tensor = tensor[..., 0]
    if tensor.dim() == 2:                                        # grey: the reference repeats it to RGB
        tensor = tensor[..., None].expand(-1, -1, 3)
    if tensor.dim() != 3 or tensor.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] (RGB, channels last) or [H, W] grey, got {tuple(tensor.shape)}; "
                         "composite or drop an alpha channel first")
    return tensor.permute(2, 0, 1).contiguous()


def _is_pil_image(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.")


def _open_image(path: Path) -> Any:
    if path.is_dir():
        raise ValueError(f"image path {path} is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        from PIL import Image, ImageOps
    except ImportError as e:
        raise ModuleNotFoundError(f"reading the image file {path} needs Pillow (pip install pillow); "
                                  "or pass the decoded [H, W, 3] array") from e
    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened).copy()     # upright, as the reference's load_image; decodes it
    except MemoryError:
        raise
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise ValueError(f"cannot decode image file {path}: {e}") from e


def _pil_to_rgb_array(image: Any) -> np.ndarray:
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:    # transparency over white
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def _resize(frames: torch.Tensor, factor: int, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """frames: [T, 3, H, W] -> [T, 3, H', W'] bicubic with antialiasing, H' and W' from smart_resize."""
    height, width = frames.shape[-2:]
    size = smart_resize(height, width, factor, min_pixels, max_pixels)
    if size == (height, width):
        return frames
    dtype = frames.dtype
    # uint8, fp32 and fp64 are resized natively; other floats go through fp32 and back, like torchvision.
    native = dtype in (torch.uint8, torch.float32, torch.float64)
    resized = F.interpolate(frames if native else frames.float(), size=list(size), mode="bicubic",
                            align_corners=False, antialias=True)
    return resized.to(dtype)


def _normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x / 255 - mean) / std, computed as the reference does: (x - 255 mean) / (255 std) in fp32."""
    if len(mean) != 3 or len(std) != 3 or not all(std):
        raise ValueError(f"mean and std need 3 values each and std no zero, got {list(mean)} and {list(std)}")
    scaled_mean = (torch.tensor(mean) * (1.0 / RESCALE_FACTOR)).view(3, 1, 1)
    scaled_std = (torch.tensor(std) * (1.0 / RESCALE_FACTOR)).view(3, 1, 1)
    return (frames.to(torch.float32) - scaled_mean) / scaled_std


def _patchify(frames: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """frames: [T, 3, H, W] -> ([t * h * w, 3 * temporal * patch**2] in merge-block order, grid_thw [[t, h, w]])."""
    if pad := -frames.shape[0] % temporal:                     # repeat the last frame up to whole temporal patches
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    T, C, H, W = frames.shape
    t, h, w = T // temporal, H // patch, W // patch
    patches = frames.view(t, temporal, C, h // merge, merge, patch, w // merge, merge, patch)
    # -> (t, block row, block col, row in block, col in block | channel, frame, y, x)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(t * h * w, C * temporal * patch * patch), torch.tensor([[t, h, w]])
