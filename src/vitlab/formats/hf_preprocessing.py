"""How transformers feeds a model its images (`preprocessor_config.json`), read into vitlab's
ModelConfig fields and written from them.

transformers' image processors resize (`size`: {"height", "width"} squashes the whole image,
{"shortest_edge"} keeps its aspect), crop the centre (`crop_size`), rescale the pixels (255 ->
`rescale_factor`, 1/255 by default) and normalise (`image_mean`, `image_std`). vitlab's fields say
the same relative to the model's side: `resize`, `crop_pct` = crop / resized side, `interpolation`,
and the mean and std of images in [0, 1]. What vitlab does not compute (another resampling filter, a
longest-edge resize, an image left unresized) is refused naming the field.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import CheckpointError

# PIL's resampling filters by number, as transformers writes them
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
# Processors whose integer `size` (older files: "size": 224) is the shortest edge; the others'
# is a square (transformers' get_size_dict(default_to_square=False) in CLIP's and BiT's processors)
_SHORTEST_EDGE_PROCESSORS = ("CLIP", "Bit")


def read_preprocessing(processor: dict | None, fallback: ModelConfig, name: str) -> dict:
    """The ModelConfig fields of how images are fed, from `processor` (preprocessor_config.json),
    else `fallback`'s (the variant the weights are loaded into, or their family's)."""
    if not processor:
        return fallback.preprocessing()

    def refuse(field: str, why: str):
        raise CheckpointError(
            f"{name}: preprocessor_config.json {field} {processor.get(field)!r}: {why}"
        )

    if not processor.get("do_resize", True):
        refuse("do_resize", "vitlab resizes every image to the model's side")
    kind = processor.get("image_processor_type") or processor.get("feature_extractor_type") or ""
    resize, side = _size(processor.get("size"), kind.startswith(_SHORTEST_EDGE_PROCESSORS), refuse)
    crop_pct = 1.0
    if processor.get("do_center_crop", "crop_size" in processor):
        _, crop = _size(processor.get("crop_size"), False, refuse, "crop_size")
        crop_pct = crop / side if crop <= side else refuse("crop_size", "larger than the resize")
    elif resize == "shorter_side":
        refuse("size", "the shortest edge without a centre crop leaves images unsquare")
    resample = processor.get("resample")
    if resample is not None and resample not in _RESAMPLE:
        refuse("resample", "vitlab resamples bilinear (2) or bicubic (3)")
    for field in ("image_mean", "image_std"):
        values = processor.get(field, (0.0,) * 3)
        if not (isinstance(values, (list, tuple)) and len(values) == 3):
            refuse(field, "vitlab normalises each of the 3 channels by a number of its own")
    return {
        **_normalisation(processor, fallback),
        "resize": resize,
        "crop_pct": crop_pct,
        "interpolation": _RESAMPLE.get(resample, fallback.interpolation),
    }


def _size(value, shortest_edge: bool, refuse, field: str = "size") -> tuple[str, int]:
    """("squash" or "shorter_side", pixels) of a processor's size or crop_size."""
    if isinstance(value, int):
        value = {"shortest_edge": value} if shortest_edge else {"height": value, "width": value}
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        return "shorter_side", value["shortest_edge"]
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        if value["height"] == value["width"]:
            return "squash", value["height"]
        refuse(field, "a rectangle, and vitlab's models take square images")
    refuse(field, "vitlab resizes to a square (height and width) or by the shortest edge")


def _normalisation(processor: dict, fallback: ModelConfig) -> dict:
    """image_mean and image_std for images in [0, 1]. transformers computes (x * rescale - mean) /
    std of pixels x in 0..255, which is (u - mean / s) / (std / s) of u = x / 255, s = 255 *
    rescale (1 where it rescales by 1/255, 255 where it does not rescale)."""
    scale = (
        255 * processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 255
    )
    if processor.get("do_normalize", True):
        mean = processor.get("image_mean", fallback.image_mean)
        std = processor.get("image_std", fallback.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return {
        "image_mean": tuple(m / scale for m in mean),
        "image_std": tuple(s / scale for s in std),
    }


def write_preprocessing(config: ModelConfig) -> dict:
    """preprocessor_config.json of how `config` feeds its images: ViT's processor where the whole
    image is squashed to the model's side, DeiT's where it is squashed larger and its centre cut,
    CLIP's where its shorter side is resized (each in transformers since 4.x)."""
    side = round(config.img_size / config.crop_pct)
    crop = {
        "do_center_crop": True,
        "crop_size": {"height": config.img_size, "width": config.img_size},
    }
    if config.resize == "shorter_side":
        kind, size = "CLIPImageProcessor", {"shortest_edge": side}
    else:
        kind, size = "DeiTImageProcessor", {"height": side, "width": side}
        if config.crop_pct == 1:
            kind, crop = "ViTImageProcessor", {}
    return {
        "image_processor_type": kind,
        "do_resize": True,
        "size": size,
        "resample": {v: k for k, v in _RESAMPLE.items()}[config.interpolation],
        **crop,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
    }
