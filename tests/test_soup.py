"""Model soups: the average, the greedy selection, the refusals, and cxr-soup end to end."""
import json
import re

import pytest
import torch

from cxr.models.soup import average_weights, check_soup_members, greedy_soup
from tests.interrupt import sigterm_fails_unless_handled
from tests.test_train_eval import TINY, command, run


def tiny_net(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    net = timm.create_model("test_efficientnet", num_classes=3)
    for module in net.modules():  # distinct BatchNorm statistics, so buffers are averaged too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return net


def test_average_weights_is_the_mean_of_parameters_and_batchnorm_statistics():
    nets = [tiny_net(0), tiny_net(1), tiny_net(2)]
    for net, batches in zip(nets, (0, 3, 3)):  # members that trained for different numbers of steps
        for name, buffer in net.named_buffers():
            if name.endswith("num_batches_tracked"):
                buffer.fill_(batches)
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    soup = average_weights(nets).state_dict()
    for key, value in soup.items():
        if value.is_floating_point():
            assert torch.allclose(value, sum(b[key] for b in before) / 3, atol=1e-6), key
        else:  # the integer count too: (0 + 3 + 3) / 3, not a running mean truncated at each step
            assert value.item() == 2, key
    assert any("running_var" in k for k in soup) and any("num_batches_tracked" in k for k in soup)
    for net, state in zip(nets, before):  # the members are left as they were
        assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def flat(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_greedy_soup_keeps_members_that_help_and_leaves_out_one_that_spoils_the_average():
    target = tiny_net(0)
    near = []
    for seed in (1, 2):
        net = tiny_net(0)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))  # independent noise: the average is closer to the target
        near.append(net)
    far = tiny_net(3)
    score = lambda net: -float(torch.linalg.norm(flat(net) - flat(target)))  # noqa: E731
    selection = greedy_soup([far, near[0], near[1]], score)
    assert selection["kept"] == [1, 2]
    assert selection["score"] > max(selection["member_scores"])
    first, second = selection["steps"]  # the better near member starts; the other near one helps, the far one not
    assert first["added"] in (1, 2) and first["kept"]
    assert second["added"] == 0 and not second["kept"]


def test_members_must_share_architecture_preprocessing_classes_and_data():
    spec = {"class_names": ["normal", "tb"], "backbone": "b", "backbone_kwargs": {}, "preprocessing": {"image_size": 224},
            "data_summary": {"counts": {"train": {"s": {"normal": 3}}}}}
    check_soup_members([spec, dict(spec)], ["a.ckpt", "b.ckpt"])
    with pytest.raises(ValueError, match="b.ckpt differs from a.ckpt in preprocessing"):
        check_soup_members([spec, {**spec, "preprocessing": {"image_size": 288}}], ["a.ckpt", "b.ckpt"])
    with pytest.raises(ValueError, match="in data_summary"):
        check_soup_members([spec, {**spec, "data_summary": {"counts": {}}}], ["a.ckpt", "b.ckpt"])
    with pytest.raises(ValueError, match="at least two"):
        check_soup_members([spec], ["a.ckpt"])


def test_member_paths_expand_each_pattern_of_a_list_in_the_order_given(tmp_path):
    from cxr.soup import member_paths

    files = {name: tmp_path / name / "best.ckpt" for name in ("sweep/1", "sweep/0", "other")}
    for path in files.values():
        path.parent.mkdir(parents=True)
        path.write_text("x")
    listed = member_paths([str(files["other"]), f"{tmp_path}/sweep/*/best.ckpt", f"{tmp_path}/*/0/best.ckpt",
                           str(files["other"])])
    assert listed == [files["other"], files["sweep/0"], files["sweep/1"], files["other"]]
    assert member_paths(f"{tmp_path}/sweep/*/best.ckpt") == [files["sweep/0"], files["sweep/1"]]
    with pytest.raises(FileNotFoundError, match=re.escape(f"members: {tmp_path}/runs/*/best.ckpt matched no file")):
        member_paths([str(files["other"]), f"{tmp_path}/runs/*/best.ckpt"])
    with pytest.raises(FileNotFoundError, match="^checkpoints not found: .*/missing.ckpt$"):
        member_paths([f"{tmp_path}/sweep/*/best.ckpt", str(tmp_path / "missing.ckpt")])


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    cache = tmp_path_factory.mktemp("soup_cache")
    paths = []
    for seed in (1, 2):
        out = tmp_path_factory.mktemp(f"member{seed}")
        # Another seed, the same split: synthetic data has no split column, and data.split_seed draws it.
        run("cxr.train", "debug=smoke", *TINY, "data.batch_size=8", f"seed={seed}",
            f"paths.output_dir={out}", cache_dir=cache)
        paths.append(out / "checkpoints" / "best.ckpt")
    return paths, cache


DATA = ["data.n_per_class=20", "data.size=96"]


def test_soup_of_one_checkpoint_twice_is_that_checkpoint(members, tmp_path):
    from cxr.inference import load_classifier

    (first, _), cache = members
    stdout = run("cxr.soup", f"members=[{first},{first}]", "method=uniform", *DATA, f"paths.output_dir={tmp_path}",
                 cache_dir=cache)
    soup = tmp_path / "checkpoints" / "best.ckpt"
    assert stdout.strip().splitlines()[-1] == str(soup)
    member_state, soup_state = load_classifier(first).net.state_dict(), load_classifier(soup).net.state_dict()
    assert all(torch.allclose(member_state[k].float(), v.float(), atol=1e-6) for k, v in soup_state.items())
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((first.parent.parent / "eval" / "metrics.json").read_text())
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    assert evaluated["macro_auroc"] == pytest.approx(trained["macro_auroc"], abs=1e-6)
    # Its feature distance is fitted again, to the soup's own features: here the member's.
    assert evaluated["unlike_training"]["threshold"] == pytest.approx(trained["unlike_training"]["threshold"], rel=1e-4)
    assert evaluated["unlike_training"]["by_source"] == trained["unlike_training"]["by_source"]


def test_ensemble_of_one_checkpoint_twice_predicts_what_that_checkpoint_does(members, tmp_path):
    from cxr.checkpoint import read_checkpoint

    (first, _), cache = members
    run("cxr.soup", f"members=[{first},{first}]", "method=ensemble", *DATA, f"paths.output_dir={tmp_path}",
        cache_dir=cache)
    _, spec = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert spec["ensemble_size"] == 2 and spec["soup"]["method"] == "ensemble" and spec["soup"]["kept"] == [0, 1]
    assert "feature_distance" not in spec  # members' features differ: no single distance
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "unlike_training" not in evaluated
    trained = json.loads((first.parent.parent / "eval" / "metrics.json").read_text())
    # log-mean-probability differs from the member's logits by a per-image constant: same calibration, same calls
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    assert evaluated["macro_auroc"] == pytest.approx(trained["macro_auroc"], abs=1e-6)


def test_snapshots_of_one_run_make_an_ensemble_whose_fit_time_is_that_run(tmp_path):
    from cxr.checkpoint import read_spec

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run("cxr.train", "debug=smoke", *TINY, "data.batch_size=8", "callbacks=snapshots", "callbacks.lr_decay.cycle_epochs=1",
        "trainer.max_epochs=2", f"paths.output_dir={run_dir}", cache_dir=cache)
    snapshots = sorted((run_dir / "checkpoints" / "snapshots").glob("*.ckpt"))
    assert [p.name for p in snapshots] == ["epoch0.ckpt", "epoch1.ckpt"]
    out = tmp_path / "ensemble"
    run("cxr.soup", f"members={run_dir}/checkpoints/snapshots/*.ckpt", "method=ensemble", *DATA,
        f"paths.output_dir={out}", cache_dir=cache)
    assert read_spec(out / "checkpoints" / "best.ckpt")["ensemble_size"] == 2
    results = json.loads((out / "results.json").read_text())
    fit = json.loads((run_dir / "results.json").read_text())["fit_seconds"]
    assert results["run_fit_seconds"] == {str(run_dir): pytest.approx(fit)} and results["fit_seconds"] == pytest.approx(fit)


def test_greedy_soup_writes_a_calibrated_checkpoint_and_its_record(members, tmp_path):
    from cxr.checkpoint import read_checkpoint

    (first, second), cache = members
    run("cxr.soup", f"members=[{first},{second}]", *DATA, f"paths.output_dir={tmp_path}", cache_dir=cache)
    checkpoint, spec = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert "optimizer_states" not in checkpoint  # one member's training state does not describe the soup
    record = spec["soup"]
    assert record["method"] == "greedy" and record["select_split"] == "val"
    assert [m["path"] for m in record["members"]] == [str(first), str(second)]
    assert len(record["steps"]) == 1 and record["kept"] and set(record["kept"]) <= {0, 1}
    assert record["select_macro_auroc"] >= max(m["select_macro_auroc"] for m in record["members"])
    assert spec["calibration_fit"]["split"] == "val"
    results = json.loads((tmp_path / "results.json").read_text())
    fits = {str(p.parent.parent): json.loads((p.parent.parent / "results.json").read_text())["fit_seconds"]
            for p in (first, second)}
    assert results["run_fit_seconds"] == pytest.approx(fits)
    assert results["fit_seconds"] == pytest.approx(sum(fits.values()))
    assert results["eval"]["n"] == json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] > 0
    assert results["code"] == json.loads((first.parent.parent / "results.json").read_text())["code"]  # one checkout


def test_soup_refuses_other_data_than_the_members_and_an_existing_output(members, tmp_path):
    import subprocess

    from tests.conftest import PROJECT_ROOT

    (first, second), cache = members

    def soup(*overrides):
        return subprocess.run(command("cxr.soup", (f"members=[{first},{second}]", *overrides), cache), cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=600)

    # The same images, split by another seed (the split fingerprint differs even where counts agree).
    other = soup(*DATA, "data.split_seed=7", f"paths.output_dir={tmp_path / 'other'}")
    assert other.returncode != 0 and "is not the data the members were trained on" in other.stderr
    (tmp_path / "taken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "taken" / "checkpoints" / "best.ckpt").write_text("x")
    taken = soup(*DATA, f"paths.output_dir={tmp_path / 'taken'}")
    assert taken.returncode != 0 and "holds an interrupted run" in taken.stderr, taken.stderr[-2000:]
    assert "choose a new paths.output_dir=" in taken.stderr
    assert (tmp_path / "taken" / "checkpoints" / "best.ckpt").read_text() == "x"
    # The operating point tuned on the images the soup is then measured on: cxr-train refuses it, so does the soup.
    on_test = soup(*DATA, "calibration.split=test", f"paths.output_dir={tmp_path / 'on_test'}")
    assert on_test.returncode != 0 and "calibration.split=test is the split the soup is evaluated on" in on_test.stderr
    assert "Traceback" not in on_test.stderr and not (tmp_path / "on_test" / "checkpoints").exists()


def compose_soup(*overrides: str):
    from hydra import compose, initialize_config_dir

    from cxr.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("soup", overrides=list(overrides))


def test_a_soup_that_fails_after_it_is_made_leaves_no_best_checkpoint(members, tmp_path, monkeypatch):
    """It was written first and calibrated and given its feature distance after: a failure on the way left a
    best.ckpt without them, one that would never flag an image unlike its training data."""
    from cxr import soup as soup_module

    (first, second), cache = members
    cfg = compose_soup(f"members=[{first},{second}]", "method=uniform", *DATA, f"paths.output_dir={tmp_path}",
                       f"paths.cache_dir={cache}")

    def fail(*args, **kwargs):
        raise RuntimeError("the feature-distance fit failed")

    monkeypatch.setattr(soup_module, "fit_feature_distance_checkpoint", fail)
    with pytest.raises(RuntimeError, match="the feature-distance fit failed"):
        soup_module.main.__wrapped__.__wrapped__(cfg)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_soup_stopped_by_sigterm_says_so_and_leaves_no_checkpoint(members, tmp_path, monkeypatch):
    """SIGTERM (a scheduler, `docker stop`) while the soup was being calibrated ended the process on the spot:
    checkpoints/best.unfinished.ckpt stayed behind and the exit status did not say why."""
    import os
    import signal

    from cxr import soup as soup_module

    (first, second), cache = members
    cfg = compose_soup(f"members=[{first},{second}]", "method=uniform", *DATA, f"paths.output_dir={tmp_path}",
                       f"paths.cache_dir={cache}")

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the soup")

    monkeypatch.setattr(soup_module, "fit_feature_distance_checkpoint", terminated)
    with sigterm_fails_unless_handled() as default_action:
        with pytest.raises(SystemExit) as stopped:
            soup_module.main.__wrapped__(cfg)
        assert signal.getsignal(signal.SIGTERM) is default_action  # the entry point gives the signal back
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list((tmp_path / "checkpoints").iterdir()) == []
