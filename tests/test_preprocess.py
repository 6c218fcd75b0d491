"""One preprocessing definition: round-trips through the checkpoint and gives identical pixels."""
import numpy as np
import pytest
import torch

from cxr.data.preprocess import Preprocessing
from cxr.inference import load_classifier


def test_round_trip_through_dict_gives_identical_tensors():
    prep = Preprocessing(image_size=48, crop_border=0.05, effective_size=32, equalize="clahe")
    image = np.random.default_rng(0).integers(0, 256, (90, 70), dtype=np.uint8)
    again = Preprocessing.from_dict(prep.to_dict())
    assert again == prep
    assert torch.equal(prep(image), again(image))


def test_output_shape_channels_and_normalisation():
    prep = Preprocessing(image_size=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = prep(np.full((100, 80), 255, np.uint8))
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out))


def test_border_crop_removes_burned_in_marker():
    image = np.full((100, 100), 100, np.uint8)
    image[:4, :20] = 255  # a bright marker in the corner
    assert Preprocessing(image_size=50, crop_border=0.06).standardize(image).max() == 100
    assert Preprocessing(image_size=50).standardize(image).max() > 100


def test_effective_resolution_removes_fine_detail():
    checker = (np.indices((128, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    sharp = Preprocessing(image_size=128).standardize(checker)
    coarse = Preprocessing(image_size=128, effective_size=32).standardize(checker)
    assert sharp.std() > 100 and coarse.std() < 5


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="equalize"):
        Preprocessing(equalize="magic")
    with pytest.raises(ValueError, match="mean/std"):
        Preprocessing(in_chans=1)


def test_checkpoint_carries_preprocessing(tiny_checkpoint):
    from tests.conftest import TINY_PREPROCESSING

    classifier = load_classifier(tiny_checkpoint)
    assert classifier.preprocessing == TINY_PREPROCESSING
    assert classifier.class_names == ["normal", "pneumonia", "tuberculosis"]
    assert len(classifier.sha256) == 64
    probs = classifier.predict([np.zeros((80, 90), np.uint8), np.full((50, 50), 200, np.uint8)])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("crop_border", [0.0, 0.06, 0.24])
@pytest.mark.parametrize("height, width", [(300, 200), (101, 97), (224, 224), (1024, 887)])
def test_input_region_is_the_box_of_the_original_that_the_model_sees(crop_border, height, width):
    preprocessing = Preprocessing(image_size=64, crop_border=crop_border)
    image = np.arange(height * width, dtype=np.float32).reshape(height, width)
    crop = preprocessing._standardize.transforms[0]  # the pipeline's own border crop, when it has one
    cropped = crop(image=image)["image"] if crop_border else image
    box = preprocessing.input_region(height, width)
    assert np.array_equal(cropped, image[box["y"]:box["y"] + box["height"], box["x"]:box["x"] + box["width"]])


@pytest.mark.parametrize("equalize", ["clahe", "histogram"])
def test_the_steps_in_words_are_what_the_pipeline_does(equalize):
    """Code outside Python feeds an exported model by the words of `steps()` (ONNX metadata, /model/info):
    followed literally with OpenCV and numpy, they must give the pipeline's tensor."""
    import cv2

    pre = Preprocessing(image_size=48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_border=0.07, effective_size=64,
                        equalize=equalize, clahe_clip_limit=3.0, clahe_tile_grid=4)
    steps = pre.steps()
    assert len(steps) == 5 and "int(0.07 * side)" in steps[0] and "64 x 64" in steps[1] and "48 x 48" in steps[2]
    gray = np.random.default_rng(0).integers(0, 256, (301, 257), dtype=np.uint8)
    top, left = int(0.07 * 301), int(0.07 * 257)
    image = gray[top:301 - top, left:257 - left]
    for size in (64, 48):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    image = cv2.createCLAHE(3.0, (4, 4)).apply(image) if equalize == "clahe" else cv2.equalizeHist(image)
    channels = np.stack([(image / 255 - m) / s for m, s in zip(pre.mean, pre.std)]).astype(np.float32)
    np.testing.assert_allclose(pre(gray).numpy(), channels, atol=1e-5)
