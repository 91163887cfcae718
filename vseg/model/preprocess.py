"""Image preprocessing for both Sa2VA branches, as the released model does it.

SAM-2 branch: resize to a square (no aspect keep, PIL bicubic), scale to [0, 1], normalise with ImageNet
mean/std rounded to bf16 (the authors' code normalises in bf16, so the rounded values decide parity).
InternVL branch: dynamic tiling into 1..max_tiles square tiles of the vision tower's size, picking the
tile grid whose aspect ratio is closest to the image's, plus a thumbnail tile when there is more than one.

Resize methods (`RESIZE_METHODS`): `pil` (default) is PIL's bicubic, what Sa2VA's authors use, so released
and fine-tuned weights see the pixels they were trained on. `torch` is an opt-in speed option for inference:
`torch.nn.functional.interpolate(mode="bicubic", antialias=True)` on the uint8 tensor is PIL's filter in fixed
point (two separable passes, uint8 in between) and returns CHW directly, about 2-3x faster than PIL plus the
HWC -> CHW copy (512 -> 1024: ~7 ms against ~21 ms). It is not bit-exact: the fixed-point rounding differs by
1-2 grey levels on under 1 % of pixels. The two passes run in the order the installed Pillow uses (Pillow 13
goes vertically first when the height shrinks much more than the width): in the other order, the uint8
intermediate rounds (and clips bicubic overshoot) elsewhere, and up to a quarter of the pixels would differ.

The CPU side (data-loader workers) stops at resized uint8 pixels; `normalise` runs on the model's device.
That keeps the float maths off the loader's cores and moves 4x fewer bytes to the GPU, with the same
float32 values as normalising on the CPU.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vseg.config.predict import RESIZE_METHODS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The same constants after a round trip through bfloat16, which is what SAM-2 sees in Sa2VA.
SAM_MEAN_BF16 = (0.484375, 0.455078125, 0.40625)
SAM_STD_BF16 = (0.228515625, 0.2236328125, 0.224609375)


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """Converts an HxWx3 uint8 array (or any PIL image) to an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    return Image.fromarray(image, mode="RGB")


def _uint8_chw(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def check_resize(method: str) -> str:
    """`method` if it is one of `RESIZE_METHODS`; a ValueError naming the allowed values otherwise."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize={method!r}: expected one of {RESIZE_METHODS}")
    return method


def pil_chw(pil: Image.Image) -> torch.Tensor:
    """The image's uint8 pixels as a (3, H, W) view of an HWC copy: no transpose copy, `resize_uint8`'s kernel
    reads that layout directly (and writes a contiguous result)."""
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_uint8(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of (3, H, W) uint8 pixels to a contiguous (3, height, width) uint8 tensor.

    torch's uint8 CPU kernel for this call follows PIL's bicubic (a = -0.5, support scaled when shrinking, fixed
    point, uint8 between the two passes); a same-size call returns the pixels, as PIL returns a copy.
    """
    in_height, in_width = pixels.shape[-2:]
    if (in_height, in_width) == (height, width):
        return pixels.contiguous()
    batch = pixels[None]
    if pil_resizes_vertically_first(in_width, in_height, width, height):  # torch's one call goes horizontally first
        batch = F.interpolate(batch, size=(height, in_width), mode="bicubic", antialias=True)
    return F.interpolate(batch, size=(height, width), mode="bicubic", antialias=True)[0].contiguous()


@lru_cache(maxsize=256)
def pil_resizes_vertically_first(in_width: int, in_height: int, width: int, height: int) -> bool:
    """Whether the installed Pillow makes its vertical pass first for this resize.

    Pillow < 13 always goes horizontally first; Pillow 13 goes vertically first when the height shrinks much
    more than the width (python-pillow/Pillow#9549; the exact rule weighs the sizes). The order decides where
    the uint8 intermediate rounds and clips, so `resize_uint8` follows it: asked once per geometry with a noise
    image (where the two orders differ), and only when both sides change and the height shrinks.
    """
    if width == in_width or height >= in_height:
        return False
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (in_height, in_width), dtype=np.uint8))
    bicubic = Image.Resampling.BICUBIC
    direct = noise.resize((width, height), bicubic)
    return direct.tobytes() == noise.resize((in_width, height), bicubic).resize((width, height), bicubic).tobytes()


def normalise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 (x / 255 - mean) / std on their device; float input is returned
    unchanged (already normalised)."""
    if pixels.dtype != torch.uint8:
        return pixels
    mean_t, std_t = _channel_constants(tuple(mean), tuple(std), pixels.device)
    return (pixels.float() / 255.0 - mean_t) / std_t


@lru_cache(maxsize=32)
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (C, 1, 1) float32 tensors on `device`, made once: a tensor made on a GPU from a Python list
    is a copy from host memory that waits for every kernel queued before it (in training, the previous step's)."""
    made = torch.tensor([mean, std], dtype=torch.float32, device=device)[:, :, None, None]
    return made[0], made[1]


def sam_pixels(image: Image.Image, size: int, resize: str = "pil") -> torch.Tensor:
    """SAM-2 input before normalisation: (3, size, size) uint8, bicubic-resized like Sa2VA.

    `resize`: pil (the authors' resize, default) | torch (faster, within 1-2 grey levels; see the module doc).
    """
    if check_resize(resize) == "torch":
        return resize_uint8(pil_chw(image), size, size)
    return _uint8_chw(image.resize((size, size), Image.Resampling.BICUBIC))


def tile_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (columns, rows) tile grid InternVL uses for an image of this size.

    Among grids with min_tiles <= columns * rows <= max_tiles, the aspect ratio closest to the image's wins;
    on a tie the larger grid wins when the image has more than half its pixels (InternVL's rule).
    """
    aspect = width / height
    grids = sorted(
        {
            (c, r)
            for n in range(min_tiles, max_tiles + 1)
            for c in range(1, n + 1)
            for r in range(1, n + 1)
            if min_tiles <= c * r <= max_tiles
        },
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def internvl_tiles(
    image: Image.Image,
    tile: int,
    max_tiles: int,
    min_tiles: int = 1,
    use_thumbnail: bool = True,
    resize: str = "pil",
) -> torch.Tensor:
    """InternVL input before normalisation (ImageNet mean/std, see `normalise`): (num_tiles, 3, tile, tile) uint8.

    Args:
        image: the RGB image.
        tile: the vision tower's input size (448 for the released models).
        max_tiles: upper bound on the tile grid (Sa2VA uses 12 for images).
        min_tiles: lower bound on the tile grid.
        use_thumbnail: append a whole-image tile when the grid has more than one tile.
        resize: pil (the authors' resize, default) | torch (the whole image resized once to the grid's size as a
            tensor, tiles are views cut from it; see the module doc).
    """
    if max_tiles < min_tiles or min_tiles < 1:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    width, height = image.size
    cols, rows = tile_grid(width, height, tile, min_tiles, max_tiles)
    if check_resize(resize) == "torch":
        pixels = pil_chw(image)
        grid = resize_uint8(pixels, tile * rows, tile * cols)
        tiles = [
            grid[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)
        ]
        if use_thumbnail and len(tiles) > 1:
            tiles.append(resize_uint8(pixels, tile, tile))
        return torch.stack(tiles)
    resized = image.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
    crops = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]
    if use_thumbnail and len(crops) > 1:
        crops.append(image.resize((tile, tile), Image.Resampling.BICUBIC))
    return torch.stack([_uint8_chw(c) for c in crops])


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a boolean HxW mask to (height, width), as a float32 tensor."""
    pil = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = pil.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(resized) > 127).float()
