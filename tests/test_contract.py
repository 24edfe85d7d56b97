import numpy as np
import pytest
import torch
import torch.nn.functional as F

from u2zoo.errors import ConfigError
from u2zoo.zoo.contract import (
    PORTRAIT,
    SALIENCY,
    SALIENCY_OFFICIAL,
    Contract,
    Postprocess,
    Preprocess,
    postprocess,
    preprocess,
    to_uint8,
)


def test_bilinear_resize_matches_torch_interpolate_align_corners_false():
    rng = np.random.default_rng(0)
    image = rng.random((97, 131, 3), dtype=np.float32)
    pre = Preprocess(scale="unit", mean=(0, 0, 0), std=(1, 1, 1))
    for size in [(320, 320), (40, 50)]:  # up- and down-sampling
        ours = preprocess(image, pre, size)
        ref = F.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None],
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )[0].numpy()
        np.testing.assert_allclose(ours, ref, atol=5e-5)  # float32 rounding of source coordinates


def test_preprocess_divides_by_the_image_max_then_normalises():
    image = np.full((10, 10, 3), 0.5, np.float32)
    image[0, 0] = [0.25, 0.5, 0.5]
    x = preprocess(image, SALIENCY.pre, (10, 10))
    assert x.shape == (3, 10, 10) and x.dtype == np.float32
    # max is 0.5, so the bulk becomes 1.0 before mean/std
    np.testing.assert_allclose(
        x[:, 5, 5], (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6
    )
    np.testing.assert_allclose(x[0, 0, 0], (0.5 - 0.485) / 0.229, rtol=1e-5)


def test_black_image_gives_finite_input_and_constant_prediction_gives_zeros():
    x = preprocess(np.zeros((20, 30, 3), np.float32), SALIENCY.pre)
    assert np.isfinite(x).all()
    mask = postprocess(np.full((1, 320, 320), 0.3, np.float32), (20, 30), SALIENCY.post)
    assert mask.shape == (20, 30) and (mask == 0).all()


def test_postprocess_minmax_resize_and_invert():
    pred = np.zeros((1, 4, 4), np.float32)
    pred[0, :2] = 0.8
    pred[0, 2:] = 0.2
    mask = postprocess(pred, (8, 8), SALIENCY_OFFICIAL.post)
    assert mask.shape == (8, 8) and mask.max() == pytest.approx(1.0) and mask.min() == pytest.approx(0.0)
    assert mask[0, 0] == pytest.approx(1.0) and mask[-1, -1] == pytest.approx(0.0)
    inverted = postprocess(pred, (8, 8), PORTRAIT.post)
    np.testing.assert_allclose(inverted, 1.0 - mask, atol=1e-6)
    assert to_uint8(mask).dtype == np.uint8 and to_uint8(mask).max() == 255


def test_contract_round_trips_through_a_manifest_dict():
    import json

    for contract in (SALIENCY, PORTRAIT):
        assert Contract.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract
    with pytest.raises(ConfigError, match="malformed"):
        Contract.from_dict({"pre": {}})


def test_unknown_filter_and_scale_are_config_errors():
    with pytest.raises(ConfigError, match="resize filter"):
        preprocess(np.ones((5, 5, 3), np.float32), Preprocess(resize_filter="cubicish"), (4, 4))
    with pytest.raises(ConfigError, match="scale"):
        preprocess(np.ones((5, 5, 3), np.float32), Preprocess(scale="x255"), (4, 4))
    with pytest.raises(ConfigError, match="normalisation"):
        postprocess(np.ones((1, 4, 4), np.float32), (4, 4), Postprocess(normalize="softmax"))
