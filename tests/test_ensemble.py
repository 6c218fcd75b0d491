"""Prediction ensembles: the mean of the members' probabilities, saved, loaded, explained and exported as one model."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_checkpoint
from cxr.explain import GradCamExplainer
from cxr.inference import Classifier, load_classifier
from cxr.models.ensemble import PredictionEnsemble
from cxr.models.soup import check_soup_members
from cxr.soup import write_soup_checkpoint


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("members")
    return [make_tiny_checkpoint(folder / f"m{seed}.ckpt", seed=seed) for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def ensemble_ckpt(members, tmp_path_factory):
    nets = [load_classifier(p).net for p in members]
    return write_soup_checkpoint(members[0], PredictionEnsemble(nets), tmp_path_factory.mktemp("ens") / "best.ckpt",
                                 {"method": "ensemble"})


def batch(n=4, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_softmax_of_the_output_is_the_mean_of_the_members_probabilities(members):
    nets = [load_classifier(p).net for p in members]
    x = batch()
    with torch.no_grad():
        expected = torch.stack([torch.softmax(net(x), dim=1) for net in nets]).mean(0)
        got = torch.softmax(PredictionEnsemble(nets)(x), dim=1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, torch.softmax(nets[0](x), dim=1), atol=2e-5)  # the members do differ
    with pytest.raises(ValueError, match="at least two"):
        PredictionEnsemble(nets[:1])


def test_checkpoint_round_trip(members, ensemble_ckpt):
    ensemble = load_classifier(ensemble_ckpt)
    assert ensemble.spec["ensemble_size"] == 3 and isinstance(ensemble.net, PredictionEnsemble)
    x = batch(seed=1)
    expected = torch.stack([load_classifier(p).probabilities(x) for p in members]).mean(0)
    torch.testing.assert_close(ensemble.probabilities(x), expected, atol=1e-6, rtol=1e-5)


def test_an_ensemble_is_not_a_member_of_another(members, ensemble_ckpt):
    specs = [load_classifier(p).spec for p in (members[0], ensemble_ckpt)]
    with pytest.raises(ValueError, match="already an ensemble of 3 networks"):
        check_soup_members(specs, ["a.ckpt", "ens.ckpt"])


def test_gradcam_averages_one_layer_per_member(ensemble_ckpt):
    explainer = GradCamExplainer(load_classifier(ensemble_ckpt))
    members = explainer.classifier.net.members
    assert explainer.target_layers == [m.bn2 for m in members]
    rng = np.random.default_rng(0)
    result = explainer.explain((rng.random((80, 90)) * 255).astype(np.uint8), "pneumonia")
    assert result.target_class == "pneumonia" and result.heatmap.shape == (64, 64)
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0 and result.heatmap.max() > 0


def test_onnx_export_matches_torch(ensemble_ckpt, tmp_path):
    from cxr.export import export_onnx, max_probability_difference

    classifier = load_classifier(ensemble_ckpt)
    path = export_onnx(classifier, tmp_path / "ensemble.onnx")
    rng = np.random.default_rng(0)
    images = [(rng.random((70, 60)) * 255).astype(np.uint8) for _ in range(3)]
    assert max_probability_difference(classifier, path, images) < 1e-4


class BrightnessMember(nn.Module):
    """One feature map, `sign` x the image's brightness, 4x4-pooled; class 0's logit is `strength` x its mean."""

    def __init__(self, sign: float, strength: float):
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.features.weight, sign / 3)
        self.pool = nn.AvgPool2d(4)
        self.head = nn.Linear(1, 3, bias=False)
        with torch.no_grad():
            self.head.weight[:] = torch.tensor([[1.0], [-1.0], [0.0]]) * strength

    def forward(self, x):
        return self.head(self.pool(self.features(x)).mean((2, 3)))


def test_gradcam_weighs_members_by_how_much_they_move_the_ensemble(ensemble_ckpt):
    spec = {**load_classifier(ensemble_ckpt).spec, "ensemble_size": 2}
    # The bright square decides the ensemble's score; a second member keyed to the dark background barely moves it.
    decisive, negligible = BrightnessMember(+1, 5.0), BrightnessMember(-1, 5e-4)
    ensemble = Classifier(net=PredictionEnsemble([decisive, negligible]), spec=spec)
    gray = np.full((64, 64), 20, np.uint8)
    gray[10:26, 36:52] = 240
    explainer = GradCamExplainer(ensemble)
    assert explainer.target_layers == [decisive.pool, negligible.pool]
    heatmap = explainer.explain(gray, 0).heatmap
    square = np.zeros(heatmap.shape, bool)
    square[10:26, 36:52] = True
    assert heatmap[square].mean() > 0.5 > 5 * heatmap[~square].mean()
