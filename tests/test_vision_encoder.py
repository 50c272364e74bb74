"""Vision encoder against transformers' Qwen3-Omni vision tower on the same random checkpoint, and image/video
preprocessing against transformers' Qwen2-VL image and video processors with the Qwen3-Omni settings."""
import json

import numpy as np
import pytest
import torch

from omni_runtime.loader import checkpoint_files, load_weights
from omni_runtime.models.vision_encoder import VisionEncoder, VisionEncoderConfig
from omni_runtime.preprocess.vision import (
    VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, preprocess_image, preprocess_video, preprocessor_kwargs, smart_resize,
)

# (atol, rtol): fp32 differs only by the patch embedding's summation order (Conv3d there, a matmul here; ~1e-7 seen
# on outputs of ~0.1); bf16 repeats the reference's roundings op for op (bit-identical seen), checked loosely.
TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2e-3, 1.6e-2)}
GRIDS = {
    "image-4x6": [[1, 4, 6]],
    "image-6x4": [[1, 6, 4]],
    "video-2x4x4": [[2, 4, 4]],
    "two-images": [[1, 4, 6], [1, 6, 4]],
    "image-and-video": [[1, 2, 8], [3, 4, 2]],
}
# The released preprocessor_config.json (image processor settings).
RELEASE_IMAGE_SETTINGS = dict(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=3136,
                              max_pixels=12845056, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
LEVEL = 1 / 127.5   # one step of a uint8 pixel after normalisation with mean = std = 0.5


@pytest.fixture(scope="module")
def encoders(reference_checkpoint):
    """dtype -> (ours loaded from the saved folder, the reference's vision tower loaded with from_pretrained)."""
    folder, _ = reference_checkpoint()
    cfg = VisionEncoderConfig.from_dict(json.loads((folder / "config.json").read_text())["thinker_config"]
                                        ["vision_config"])
    built = {}

    def load(dtype):
        if dtype not in built:
            from transformers import Qwen3OmniMoeForConditionalGeneration

            reference = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder, dtype=dtype).thinker.model.visual
            with torch.device("meta"):
                ours = VisionEncoder(cfg)
            load_weights(ours, checkpoint_files(folder), ours.checkpoint_prefix, dtype, torch.device("cpu"))
            built[dtype] = ours, reference.eval()
        return built[dtype]

    return load


def _compare(ours, reference, pixel_values, grid_thw, dtype):
    with torch.no_grad():
        expected = reference(pixel_values, grid_thw=grid_thw)
        tokens, deepstack = ours(pixel_values, grid_thw)
    atol, rtol = TOLERANCES[dtype]
    merged = int(grid_thw.prod(-1).sum()) // 4
    assert tokens.shape == (merged, ours.cfg.out_hidden_size) and tokens.dtype == dtype
    torch.testing.assert_close(tokens, expected.pooler_output, atol=atol, rtol=rtol)
    assert len(deepstack) == len(expected.deepstack_features) == len(ours.cfg.deepstack_visual_indexes)
    for feature, expected_feature in zip(deepstack, expected.deepstack_features):
        torch.testing.assert_close(feature, expected_feature, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(GRIDS))
def test_encoder_matches_reference(encoders, name, dtype):
    ours, reference = encoders(dtype)
    grid_thw = torch.tensor(GRIDS[name])
    patches = int(grid_thw.prod(-1).sum())
    pixel_values = torch.randn(patches, ours.cfg.patch_dim, generator=torch.Generator().manual_seed(len(name)))
    _compare(ours, reference, pixel_values, grid_thw, dtype)


def test_encoder_on_preprocessed_image_matches_reference(encoders):
    ours, reference = encoders(torch.float32)
    pixel_values, grid_thw = preprocess_image(_smooth_image(37, 53))
    assert grid_thw.tolist() == [[1, 4, 6]]
    _compare(ours, reference, pixel_values, grid_thw, torch.float32)


# ---- preprocessing ----

def _noise_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _smooth_image(height, width):
    y, x = np.mgrid[0:height, 0:width]
    return (127 + 120 * np.sin(y[..., None] / 7 + x[..., None] / 11 + np.arange(3))).astype(np.uint8)


@pytest.mark.parametrize("size, expected", [
    ((37, 53), (64, 96)), ((300, 200), (288, 192)), ((1000, 1333), (992, 1344)), ((5000, 4000), (4000, 3200)),
    ((1, 200), (32, 800)), ((80, 112), (64, 128)),   # 80 / 32 = 2.5 rounds half to even, as Python's round
])
def test_smart_resize(size, expected):
    assert smart_resize(*size, 32, 3136, 12845056) == expected


def _normalized(image):
    return (image.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)


def _merge_block_rows(frames):
    """frames: T_even normalised [H, W, 3] arrays -> the expected pixel_values, written out patch by patch."""
    rows = []
    for t in range(0, len(frames), 2):
        height, width = frames[t].shape[:2]
        for block_row in range(height // 32):
            for block_col in range(width // 32):
                for row in range(2):
                    for col in range(2):
                        y, x = (2 * block_row + row) * 16, (2 * block_col + col) * 16
                        pair = [f[y:y + 16, x:x + 16].transpose(2, 0, 1) for f in frames[t:t + 2]]  # [3, 16, 16]
                        rows.append(np.stack(pair, 1).reshape(-1))                                # (c, frame, y, x)
    return torch.from_numpy(np.stack(rows))


def test_image_patches_in_merge_block_order():
    image = _noise_image(64, 96)                        # multiples of 32 inside the bounds: no resize
    pixel_values, grid_thw = preprocess_image(image)
    assert grid_thw.tolist() == [[1, 4, 6]] and grid_thw.dtype == torch.long
    normalized = _normalized(image)
    assert torch.equal(pixel_values, _merge_block_rows([normalized, normalized]))


def test_video_pads_with_last_frame_and_reports_seconds_per_grid():
    frames = np.stack([_noise_image(64, 96, seed) for seed in range(3)])
    pixel_values, grid_thw, second_per_grid = preprocess_video(frames, fps=4.0, min_pixels=32 * 32)   # no resize
    assert grid_thw.tolist() == [[2, 4, 6]] and second_per_grid == 0.5
    normalized = [_normalized(f) for f in frames]
    assert torch.equal(pixel_values, _merge_block_rows(normalized + normalized[-1:]))


def test_image_equals_one_frame_video_and_grey_equals_rgb():
    image = _smooth_image(37, 53)
    pixel_values, grid_thw = preprocess_image(image, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
    video_pixels, video_grid, _ = preprocess_video(image[None], fps=2.0)
    assert torch.equal(pixel_values, video_pixels) and torch.equal(grid_thw, video_grid)
    grey = image[..., 0]
    assert torch.equal(preprocess_image(grey)[0], preprocess_image(np.repeat(grey[..., None], 3, -1))[0])
    assert torch.equal(preprocess_image(torch.from_numpy(image))[0], preprocess_image(image)[0])


def test_preprocessor_config_settings(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(
        RELEASE_IMAGE_SETTINGS, processor_class="Qwen3OmniMoeProcessor", image_processor_type="Qwen2VLImageProcessor",
        feature_extractor_type="WhisperFeatureExtractor", feature_size=128, min_pixels=64 * 64)))
    kwargs = preprocessor_kwargs(tmp_path)
    assert kwargs == dict(min_pixels=4096, max_pixels=12845056, patch_size=16, temporal_patch_size=2, merge_size=2,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert preprocess_image(_smooth_image(20, 20), **kwargs)[1].tolist() == [[1, 4, 4]]
    assert preprocessor_kwargs(tmp_path / "missing") == {}


@pytest.mark.parametrize("size", [(37, 53), (300, 200), (64, 96), (1000, 1333)])
def test_image_matches_reference_processor(size):
    """transformers' default backend for Qwen3-Omni (torchvision; on the CPU it runs torch's uint8 bicubic)."""
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(**RELEASE_IMAGE_SETTINGS)
    for image in (_noise_image(*size), _smooth_image(*size)):
        expected = processor(images=image, return_tensors="pt")
        pixel_values, grid_thw = preprocess_image(image)
        assert torch.equal(grid_thw, expected["image_grid_thw"])
        torch.testing.assert_close(pixel_values, expected["pixel_values"], atol=0, rtol=0)


def test_video_matches_reference_processor():
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    settings = {key: v for key, v in RELEASE_IMAGE_SETTINGS.items() if not key.endswith("_pixels")}
    processor = Qwen2VLVideoProcessor(**settings)
    frames = np.stack([_noise_image(37, 53, seed) for seed in range(5)])
    expected = processor(videos=[frames], size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
                         cap_pixels_per_frame=False, return_tensors="pt")
    pixel_values, grid_thw, _ = preprocess_video(frames, fps=2.0)
    assert torch.equal(grid_thw, expected["video_grid_thw"])
    torch.testing.assert_close(pixel_values, expected["pixel_values_videos"], atol=0, rtol=0)


@pytest.mark.parametrize("size", [(37, 53), (300, 200)])
def test_image_near_pil_reference_processor(size):
    """transformers' fallback backend without torchvision: Pillow's bicubic rounds some pixels one level apart."""
    pytest.importorskip("PIL")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = _smooth_image(*size)
    expected = Qwen2VLImageProcessorPil(**RELEASE_IMAGE_SETTINGS)(images=image, return_tensors="pt")
    pixel_values, grid_thw = preprocess_image(image)
    assert torch.equal(grid_thw, expected["image_grid_thw"])
    torch.testing.assert_close(pixel_values, expected["pixel_values"], atol=2 * LEVEL + 1e-6, rtol=0)


def test_pil_image_and_path_inputs(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    image = _smooth_image(37, 53)
    expected = preprocess_image(image)[0]
    Image.fromarray(image).save(tmp_path / "image.png")
    half_transparent = np.concatenate([image, np.full((37, 53, 1), 128, np.uint8)], -1)
    over_white = (image.astype(np.float32) * 128 / 255 + 255 * 127 / 255)
    assert torch.equal(preprocess_image(Image.fromarray(image))[0], expected)
    assert torch.equal(preprocess_image(tmp_path / "image.png")[0], expected)
    assert torch.equal(preprocess_image(str(tmp_path / "image.png"))[0], expected)
    composited = preprocess_image(Image.fromarray(half_transparent, "RGBA"))[0]
    assert (composited - preprocess_image(over_white.round().astype(np.uint8))[0]).abs().max() <= 2 * LEVEL + 1e-6


# ---- bad input ----

@pytest.mark.parametrize("image, match", [
    (np.zeros((40, 40, 4), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((40, 40, 2), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((2, 40, 40, 3), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((0, 40, 3), np.uint8), "at least 1x1"),
    (np.zeros((1, 300, 3), np.uint8), "aspect ratio 300"),
    (np.zeros((40, 40, 3), np.int32), "uint8 or floating"),
    ([[0, 0, 0]], "numpy array or a torch tensor"),
    (np.full((40, 40, 3), np.nan, np.float32), "image contains NaN or Inf"),
    (np.full((40, 40, 3), np.inf, np.float64), "image contains NaN or Inf"),
])
def test_bad_image(image, match):
    with pytest.raises(ValueError, match=match):
        preprocess_image(image)


def test_bad_image_arguments(tmp_path):
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        preprocess_image(_smooth_image(40, 40), min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="mean and std"):
        preprocess_image(_smooth_image(40, 40), std=(0.5, 0.0, 0.5))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        preprocess_image(tmp_path / "missing.png")


@pytest.mark.parametrize("frames, fps, match", [
    (np.zeros((0, 40, 40, 3), np.uint8), 1.0, "no frames"),
    (np.zeros((40, 40, 3), np.uint8), 1.0, r"\[T, H, W, 3\]"),
    (np.zeros((2, 40, 40, 1), np.uint8), 1.0, r"\[T, H, W, 3\]"),
    (np.zeros((2, 40, 40, 3), np.uint8), 0.0, "fps"),
    (np.zeros((2, 40, 40, 3), np.uint8), float("nan"), "fps"),
    (np.full((2, 40, 40, 3), np.nan, np.float32), 1.0, "video frames contain NaN or Inf"),
])
def test_bad_video(frames, fps, match):
    with pytest.raises(ValueError, match=match):
        preprocess_video(frames, fps)


def _tiny_encoder():
    with torch.device("meta"):
        return VisionEncoder(VisionEncoderConfig(depth=1, hidden_size=8, intermediate_size=8, num_heads=2,
                                                 out_hidden_size=8, deepstack_visual_indexes=()))


@pytest.mark.parametrize("pixels, grid, match", [
    (torch.zeros(24, 1536), [[1, 4, 4]], r"describes 16 patches but pixel_values has 24 rows"),
    (torch.zeros(24, 1536), [[1, 4, 6], [1, 2, 2]], r"describes 28 patches but pixel_values has 24 rows"),
    (torch.zeros(24, 768), [[1, 4, 6]], r"\[patches, 1536\]"),
    (torch.zeros(24, 1536, dtype=torch.long), [[1, 4, 6]], "floating point"),
    (torch.zeros(24, 1536), [[1, 3, 8]], "multiples of spatial_merge_size 2"),
    (torch.zeros(24, 1536), [[0, 4, 6]], ">= 1"),
    (torch.zeros(24, 1536), [1, 4, 6], r"\[images, 3\]"),
    (torch.zeros(24, 1536), [[1.0, 4.0, 6.0]], r"integer"),
    (torch.zeros(24, 1536).index_fill(0, torch.tensor([5]), float("nan")), [[1, 4, 6]], "NaN or Inf"),
])
def test_bad_encoder_input(pixels, grid, match):
    with pytest.raises(ValueError, match=match):
        _tiny_encoder()(pixels, torch.tensor(grid))


@pytest.mark.parametrize("overrides, match", [
    (dict(deepstack_visual_indexes=[0, 27]), "below depth 27"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "rope_type"),
    (dict(hidden_size=1152, num_heads=10), "heads"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(num_position_embeddings=2300), "square"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        VisionEncoderConfig.from_dict(overrides)
