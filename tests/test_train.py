"""Training studies: initialization and transfer, foreign weights, freezing, heads,
augmentations, adversarial batches, extra evaluation sets, the recipe options, bad input."""
import json
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from fastablate.cli import cli
from fastablate.models import build_model, load_model, save_checkpoint
from fastablate.models.transfer import IMAGENET, imagenet_file, init_from_checkpoint

SYN = ["--dataset", "synthetic", "--limit", "40", "--batch-size", "20", "--device", "cpu"]


def run(*args, env=None, code=0):
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert r.exit_code == code, (r.output, r.exception)
    return r


def error(*args, env=None):
    r = run(*args, env=env, code=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# --- initialization -----------------------------------------------------------------------
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A torch hub cache holding a stand-in for torchvision's ImageNet resnet18 weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, _ = imagenet_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.manual_seed(5)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    return path, state


def test_init_imagenet_loads_what_fits(hub, tmp_path):
    path, state = hub
    out = tmp_path / "o"
    r = run("train", "--model", "resnet18", *SYN, "--epochs", "1", "--init", "imagenet", "--freeze", "layer1,layer2",
            "--out", out)
    assert "keep their fresh initialization" in r.stderr and "conv1.weight" in r.stderr and "fc.weight" in r.stderr
    model = load_model(out / "model.pt")
    assert torch.equal(model.net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])  # frozen: still ImageNet's
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))  # ImageNet's normalization
    info = json.loads((out / "run.json").read_text())
    assert info["init"] == f"imagenet {path}" and info["frozen"] == ["layer1", "layer2"]
    assert info["frozen_parameters"] > 0 and info["trainable_parameters"] > 0


@pytest.mark.slow
def test_imagenet_stem_takes_every_imagenet_weight_and_the_size_is_recorded(hub, tmp_path):
    path, state = hub
    out = tmp_path / "o"
    r = run("train", "--model", "resnet18", *SYN, "--epochs", "1", "--init", "imagenet", "--stem", "imagenet",
            "--image-size", "64", "--freeze", "6", "--out", out)
    assert "1 keep" not in r.stderr and "conv1.weight" not in r.stderr and "fc.weight" in r.stderr  # only the head
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["image_size"] == 64 and ckpt["stem"] == "imagenet"
    model = load_model(out / "model.pt")
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"]) and model.net.conv1.kernel_size == (7, 7)
    # eval takes the checkpoint's size unless told otherwise; the stem stays the trained one
    run("eval", "--weights", out / "model.pt", *SYN, "--out", tmp_path / "e")
    assert json.loads((tmp_path / "e" / "results.json").read_text())["accuracy"] == results(out)["accuracy"]
    run("eval", "--weights", out / "model.pt", *SYN, "--image-size", "96", "--out", tmp_path / "e96")
    assert json.loads((tmp_path / "e96" / "run.json").read_text())["config"]["image_size"] == 96


def test_image_size_below_the_models_minimum(tmp_path):
    msg = error("train", "--model", "vgg11", *SYN, "--image-size", "16", "--out", tmp_path / "o")
    assert "cannot take 16x16 images" in msg and not (tmp_path / "o").exists()


def test_init_imagenet_absent_or_impossible(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    path, url = imagenet_file("vgg11")
    msg = error("train", "--model", "vgg11", *SYN, "--init", "imagenet", "--out", tmp_path / "o")
    assert f"{path} is missing" in msg and url in msg and not (tmp_path / "o").exists()
    assert "no ImageNet weights for plain18" in error("train", "--model", "plain18", *SYN, "--init", "imagenet")
    assert set(IMAGENET) >= {"resnet18", "resnet34", "resnet50", "vgg11", "vgg19_bn"}


def test_foreign_pre_041_checkpoint_loads_by_position(tmp_path):
    """The common CIFAR ResNet files: no BatchNorm counters, the head named 'linear'."""
    torch.manual_seed(0)
    model = build_model("resnet20")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    state = {k.replace("fc.", "linear."): v for k, v in model.net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, tmp_path / "old.th")
    r = run("eval", "--model", "resnet20", "--weights", tmp_path / "old.th", *SYN, "--mean", "0.5,0.5,0.5",
            "--std", "0.5,0.5,0.5", "--out", tmp_path / "e")
    assert "names 2 tensors differently from resnet20; loaded by position: linear.weight -> fc.weight" in r.stderr
    loaded = load_model(tmp_path / "old.th", "resnet20", mean=(0.5,) * 3, std=(0.5,) * 3).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    # Shapes that do not line up stay an error.
    state["linear.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "bad.th")
    assert "does not fit model resnet20" in error("eval", "--model", "resnet20", "--weights", tmp_path / "bad.th",
                                                 *SYN, "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_mixed_precision_trains_and_the_studies_read_its_checkpoint(precision, tmp_path):
    out = tmp_path / precision
    run("train", "--model", "resnet8", "--dataset", "synthetic", "--limit", "120", "--batch-size", "20",
        "--epochs", "2", "--precision", precision, "--out", out)
    history = results(out)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learns
    assert json.loads((out / "run.json").read_text())["config"]["precision"] == precision
    model = load_model(out / "model.pt")
    assert model.meta["precision"] == precision and next(model.parameters()).dtype == torch.float32
    state = torch.load(out / "last.pt", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")  # fp16's gradient scale, for --resume
    run("eval", "--weights", out / "model.pt", *SYN, "--lesion", "all-single", "--out", tmp_path / "lesion")
    assert len(results(tmp_path / "lesion")["variants"]) == 3


def test_weights_of_other_classes_reinitialize_the_head(tmp_path, capsys):
    torch.manual_seed(0)
    src = build_model("resnet8", 4)
    src.classes = ["w", "x", "y", "z"]
    save_checkpoint(src, tmp_path / "four.pt")
    model = build_model("resnet8", 10)
    model.classes = [f"class{i}" for i in range(10)]
    from fastablate.models.checkpoint import read_checkpoint
    init_from_checkpoint(model, read_checkpoint(tmp_path / "four.pt"), str(tmp_path / "four.pt"))
    assert "the head (fc) is freshly initialized" in capsys.readouterr().err
    assert torch.equal(model.net.layer1[0].conv1.weight, src.net.layer1[0].conv1.weight)
    run("train", "--weights", tmp_path / "four.pt", *SYN, "--epochs", "1", "--out", tmp_path / "t")
    assert json.loads((tmp_path / "t" / "run.json").read_text())["init"] == f"checkpoint {tmp_path / 'four.pt'}"


# --- freezing and heads -------------------------------------------------------------------
def test_freeze_keeps_weights_and_batchnorm_statistics(tmp_path):
    out = tmp_path / "f"
    run("train", "--model", "resnet8", *SYN, "--epochs", "1", "--freeze", "stem,layer1", "--out", out)
    torch.manual_seed(0)
    init = build_model("resnet8")  # the same seed gives the same initial weights
    trained = load_model(out / "model.pt")
    for name in ("conv1.weight", "bn1.running_mean", "bn1.running_var", "layer1.0.conv2.weight",
                 "layer1.0.bn1.running_mean"):
        assert torch.equal(trained.net.state_dict()[name], init.net.state_dict()[name]), name
    assert not torch.equal(trained.net.layer2[0].conv1.weight, init.net.layer2[0].conv1.weight)
    assert json.loads((out / "run.json").read_text())["frozen"] == ["stem", "layer1"]
    run("train", "--model", "resnet8", *SYN, "--epochs", "1", "--freeze", "2", "--out", tmp_path / "n")
    assert json.loads((tmp_path / "n" / "run.json").read_text())["frozen"] == ["conv1", "bn1"]
    msg = error("train", "--model", "resnet8", *SYN, "--freeze", "layer9", "--out", tmp_path / "x")
    assert "--freeze 'layer9' names nothing in resnet8; valid: conv1, bn1, layer1" in msg and "layer1.0" in msg
    assert "freezes every parameter" in error("train", *SYN, "--freeze", "7")


@pytest.mark.parametrize("model", ["resnet8", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_mlp_head_with_dropout_trains_and_reloads(model, tmp_path):
    out = tmp_path / model
    run("train", "--model", model, *SYN, "--epochs", "1", "--head", "mlp:32,16", "--dropout", "0.3", "--out", out)
    m = load_model(out / "model.pt")
    head = m.net.fc if model == "resnet8" else m.net.classifier
    kinds = [type(x).__name__ for x in head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]  # after each hidden ReLU
    assert [x.out_features for x in head if isinstance(x, torch.nn.Linear)] == [32, 16, 10]
    run("eval", "--weights", out / "model.pt", *SYN, "--out", tmp_path / f"e-{model}")
    assert results(tmp_path / f"e-{model}")["accuracy"] == results(out)["accuracy"]


@pytest.mark.slow
def test_heads_exactly_as_written_and_dropout_in_the_body(tmp_path):
    out = tmp_path / "h"
    run("train", "--model", "resnet8", *SYN, "--epochs", "1", "--head", "linear:256,relu,dropout:0.2,linear:128,relu,"
        "dropout:0.2,linear:64,relu,linear", "--dropout", "0.3", "--dropout-after", "layer2,layer3", "--out", out)
    m = load_model(out / "model.pt")
    kinds = [type(x).__name__ for x in m.net.fc]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert [x.p for x in m.net.fc if isinstance(x, torch.nn.Dropout)] == [0.2, 0.2]
    assert m.dropout_after == ("layer2", "layer3") and len(m.net.layer2._forward_hooks) == 1
    x = torch.rand(4, 3, 32, 32)
    m.train()
    assert not torch.equal(m(x), m(x))  # the body dropout is on while training
    m.eval()
    assert torch.equal(m(x), m(x))
    run("eval", "--weights", out / "model.pt", *SYN, "--out", tmp_path / "e")
    assert results(tmp_path / "e")["accuracy"] == results(out)["accuracy"]


def test_checkpoints_of_the_old_mlp_head_still_load(tmp_path):
    """Version 1 put a dropout before every linear layer of mlp: heads."""
    old = build_model("resnet8", 10, head="dropout:0.3,linear:32,relu,dropout:0.3,linear")
    path = tmp_path / "v1.pt"
    save_checkpoint(old, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(version=1, head="mlp:32", dropout=0.3)
    del ckpt["dropout_after"]
    torch.save(ckpt, path)
    m = load_model(path)
    assert [type(x).__name__ for x in m.net.fc] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert torch.equal(m.net.fc[1].weight, old.net.fc[1].weight)


def test_validation_split_keeps_the_best_epoch(tmp_path):
    out = tmp_path / "v"
    run("train", "--model", "resnet8", *SYN, "--epochs", "3", "--val-fraction", "0.25", "--keep", "best",
        "--optimizer", "adamw", "--betas", "0.9,0.99", "--lr", "0.003", "--lr-scaling", "none", "--out", out)
    rows = (out / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    assert "val_accuracy" in head and len(rows) == 4
    values = [dict(zip(head, r.split(","))) for r in rows[1:]]
    assert [v["test_accuracy"] == "" for v in values] == [True, True, False]  # test at the end only
    best = max(range(3), key=lambda i: (float(values[i]["val_accuracy"]), -i)) + 1
    info = json.loads((out / "run.json").read_text())
    assert info["kept"] == {"rule": "best", "epoch": best, "by": "val_accuracy"}
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["meta"]["epoch"] == best and ckpt["meta"]["val_accuracy"] == float(values[best - 1]["val_accuracy"])
    res = results(out)
    assert res["kept"]["epoch"] == best and res["eval_sets"]["val"]["n"] == 10  # one image in four of each class
    run("eval", "--weights", out / "model.pt", *SYN, "--out", tmp_path / "e")  # model.pt is the kept epoch
    assert results(tmp_path / "e")["accuracy"] == res["accuracy"] == ckpt["meta"]["test_accuracy"]


def test_learning_rate_scaling_and_optimizers():
    from fastablate.engines.studies.train import TrainSpec
    from fastablate.engines.studies.train_loop import learning_rate, optimizer

    assert learning_rate(TrainSpec(), 256, 0, 10) == pytest.approx(0.2)  # per 128 images
    assert learning_rate(TrainSpec(lr_scaling="none"), 256, 0, 10) == pytest.approx(0.1)
    assert learning_rate(TrainSpec(optimizer="adam"), 128, 0, 10) == pytest.approx(1e-3)  # adam's own default
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = optimizer(TrainSpec(optimizer="adamw", betas=(0.8, 0.9)), [{"params": p, "weight_decay": 0.1}])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["weight_decay"] == 0.1


# --- augmentations, curves, evaluation sets, adversarial batches ----------------------------
@pytest.fixture(scope="module")
def saved_sets(tmp_path_factory, trained_resnet8):
    d = tmp_path_factory.mktemp("sets")
    for split in ("train", "test"):
        run("attack", "--weights", trained_resnet8, "--dataset", "synthetic", "--limit", "40", "--split", split,
            "--attack", "pgd", "--eps", "0.1", "--steps", "3", "--save-dataset", d / f"adv-{split}.pt", "--out",
            d / f"run-{split}")
    return d


@pytest.mark.slow
def test_augmentations_curves_eval_sets_and_adversarial_data(saved_sets, tmp_path):
    out = tmp_path / "a"
    run("train", "--model", "resnet8", *SYN, "--epochs", "2", "--augment", "crop,rotation:10,color-jitter,cutout:6,"
        "blur:1,salt-pepper:0.01,gaussian:0.03,resized-crop:0.7,center-crop:28,flip",
        "--adv-data", saved_sets / "adv-train.pt", "--adv-ratio", "0.25",
        "--eval-sets", f"perturbed={saved_sets / 'adv-test.pt'}", "--out", out)
    res = results(out)
    fooled = len(torch.load(saved_sets / "adv-test.pt", weights_only=True)["labels"])
    assert set(res["eval_sets"]) == {"perturbed"} and res["eval_sets"]["perturbed"]["n"] == fooled > 0
    assert {"perturbed_accuracy", "perturbed_loss", "test_accuracy"} <= set(res["history"][0])
    assert "perturbed_accuracy" in (out / "metrics.csv").read_text().splitlines()[0]
    assert (out / "plots" / "curves.png").stat().st_size > 5000
    assert (out / "plots" / "augmentations.png").stat().st_size > 5000
    assert json.loads((out / "run.json").read_text())["augment"][1] == "rotation:10"


@pytest.mark.slow
def test_adversarial_training_on_the_fly_and_recipe_options(tmp_path):
    out = tmp_path / "adv"
    run("train", "--model", "resnet8", *SYN, "--epochs", "2", "--adv-train", "pgd", "--adv-eps", "0.05",
        "--adv-steps", "2", "--schedule", "onecycle", "--warmup", "0.3", "--ema", "0.9", "--tta",
        "--label-smoothing", "0.1", "--out", out)
    res = results(out)
    assert "test_tta_accuracy" in res["history"][-1] and set(res["eval_sets"]) == {"test_tta"}
    # Same seed, same options: the same model, bit for bit (data order, augmentation, attacks).
    run("train", "--model", "resnet8", *SYN, "--epochs", "2", "--adv-train", "pgd", "--adv-eps", "0.05",
        "--adv-steps", "2", "--schedule", "onecycle", "--warmup", "0.3", "--ema", "0.9", "--tta",
        "--label-smoothing", "0.1", "--out", tmp_path / "again")
    a, b = (torch.load(p / "model.pt", weights_only=True)["state_dict"] for p in (out, tmp_path / "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_with_weight_average_matches_uninterrupted(tmp_path, monkeypatch):
    args = ["train", "--model", "resnet8", *SYN, "--epochs", "2", "--ema", "0.9", "--schedule", "onecycle"]
    run(*args, "--out", tmp_path / "full")
    import fastablate.engines.studies.train_loop as trainer
    real, calls = trainer.evaluate_all, []

    def stop_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(trainer, "evaluate_all", stop_second)
    CliRunner().invoke(cli, [str(a) for a in args] + ["--out", str(tmp_path / "part")])
    monkeypatch.setattr(trainer, "evaluate_all", real)
    run(*args, "--out", tmp_path / "part", "--resume")
    a, b = (torch.load(p / "model.pt", weights_only=True)["state_dict"] for p in (tmp_path / "full", tmp_path / "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--augment", "crop,zoom"], "--augment 'crop,zoom': has an unknown augmentation 'zoom'"),
    (["--augment", "cutout:99"], "--augment cutout:99: the strength (px side) must be in (0, 32]"),
    (["--augment", "rotation:x"], "gives rotation the strength 'x'"),
    (["--head", "mlp:"], "--head 'mlp:': has widths '' that are not whole numbers"),
    (["--head", "mlp:a,b"], "has widths 'a,b' that are not whole numbers"),
    (["--dropout", "1"], "--dropout '1': must be in [0, 1)"),
    (["--warmup", "0.3"], "--warmup applies to --schedule onecycle"),
    (["--adv-ratio", "0.3"], "--adv-ratio applies to --adv-data or --adv-train"),
    (["--adv-eps", "0.1"], "--adv-eps applies to --adv-train, which is not given"),
    (["--adv-train", "pgd", "--adv-restarts", "2"], "--adv-restarts does not apply to --adv-train pgd"),
    (["--adv-data", "{sets}/adv-test.pt", "--adv-train", "pgd"], "--adv-data and --adv-train both"),
    (["--eval-sets", "bad"], "--eval-sets 'bad': has 'bad', not name=FILE"),
    (["--eval-sets", "test={sets}/adv-test.pt"], "train, val, test and test_tta are taken"),
    (["--eval-sets", "x={sets}/nothing.pt"], "--eval-sets x={sets}/nothing.pt: no such file"),
    (["--adv-data", "{sets}/gray.pt"], "gray.pt holds images of 1 channels; synthetic/train has 3"),
    (["--adv-data", "{sets}/other-classes.pt"], "has classes that synthetic/train does not know: cat"),
    (["--init", "imagenet", "--weights", "{sets}/adv-test.pt"], "--init imagenet and --weights both"),
    (["--init", "nothing.pt"], "--init 'nothing.pt': is neither none, imagenet nor a checkpoint file"),
    (["--optimizer", "lbfgs"], "--optimizer 'lbfgs': is not one of: sgd, adam, adamw"),
    (["--betas", "0.9,0.99"], "--betas applies to --optimizer adam or adamw"),
    (["--optimizer", "adam", "--betas", "0.9"], "--betas 0.9: give two betas"),
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum applies to --optimizer sgd"),
    (["--val-fraction", "0.9"], "--val-fraction 0.9 leaves class 'class0' no training image (it has 4)"),
    (["--head", "linear:32,relu,linear:7"], "ends in linear:7, but the model has 10 classes"),
    (["--head", "linear:32,tanh,linear"], "has 'tanh', which is not a layer"),
    (["--head", "linear:32,relu"], "does not end in a linear layer to the classes"),
    (["--head", "linear:32,relu,linear", "--dropout", "0.2"], "says where its dropout goes"),
    (["--dropout", "0.2", "--dropout-after", "layer9"], "--dropout-after 'layer9' names nothing in resnet8"),
    (["--stem", "imagenet"], "--stem imagenet: model resnet8 (cifar-resnet) has one stem"),
    (["--image-size", "4"], "--image-size '4': must be in [8, 1024]"),
    (["--augment", "resize"], "--augment resize: give its strength"),
    (["--eval-sets", "val={sets}/adv-test.pt"], "train, val, test and test_tta are taken"),
])
def test_bad_training_input(args, message, saved_sets, tmp_path):
    torch.save({"images": torch.zeros(4, 1, 32, 32, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.long)},
               saved_sets / "gray.pt")
    torch.save({"images": torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.long),
                "classes": ["cat", "dog"]}, saved_sets / "other-classes.pt")
    args = [a.format(sets=saved_sets) for a in args]
    msg = error("train", "--model", "resnet8", *SYN, "--epochs", "1", *args, "--out", tmp_path / "o")
    assert message.format(sets=saved_sets) in msg
    assert not (tmp_path / "o").exists()


# --- comparing runs -----------------------------------------------------------------------
@pytest.mark.slow
def test_compare_overlays_runs_and_tabulates_final_and_best(tmp_path):
    a, b = tmp_path / "plain", tmp_path / "val"
    run("train", "--model", "resnet8", *SYN, "--epochs", "2", "--out", a)
    run("train", "--model", "resnet8", *SYN, "--epochs", "2", "--val-fraction", "0.25", "--keep", "best",
        "--augment", "crop,flip,blur:1@0.5", "--out", b)
    out = tmp_path / "cmp"
    r = run("compare", a, b, "--names", "base,heldout", "--out", out)
    assert "base" in r.output and "heldout" in r.output
    doc = results(out)
    assert set(doc["differing"]) == {"augment", "keep", "val_fraction"}
    base, held = doc["runs"]
    assert base["run"] == "base" and base["test_accuracy"] == results(a)["accuracy"]
    assert base["best_test_accuracy"] == max(h["test_accuracy"] for h in results(a)["history"])
    assert "best_val_accuracy" in held and "best_test_accuracy" not in held  # test seen once, at the end
    assert held["kept_epoch"] == results(b)["kept"]["epoch"] and held["seconds"] > 0
    assert {p.name for p in (out / "plots").iterdir()} == {"curves.png", "final.png"}
    assert (out / "results.csv").read_text().splitlines()[0].startswith("run,augment,keep,val_fraction,test_accuracy")
    failed = tmp_path / "failed"  # a sweep's failed point is left out, with a note
    failed.mkdir()
    info = json.loads((a / "run.json").read_text())
    (failed / "run.json").write_text(json.dumps({**info, "status": "failed", "error": "FastablateError: boom"}))
    r = run("compare", a, failed, "--out", tmp_path / "c2")
    assert "left out 1 run(s) that did not complete" in r.stderr and "boom" in r.stderr
    assert len(results(tmp_path / "c2")["runs"]) == 1
    # bad input: one line, exit 2, nothing written
    assert "none of the runs completed" in error("compare", failed, "--out", tmp_path / "x")
    assert "not a fastablate train run" in error("compare", tmp_path, "--out", tmp_path / "x")
    assert "--names gives 1 names for 2 runs" in error("compare", a, b, "--names", "one", "--out", tmp_path / "x")
    assert "at least one RUN_DIR" in error("compare", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- the training experiments as configs ------------------------------------------------------
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


CONFIG_GRIDS = [("transfer", 2), ("heads", 2), ("augment", 9), ("dropout", 6)]


def config_points(name: str) -> list[dict]:
    """The points of ``configs/resnet18-cifar10-<name>.yaml``'s sweep on tiny synthetic data, each
    point's options read and checked as `fastablate sweep --config` does, nothing run."""
    import yaml

    from fastablate.commands import StudyCommand
    from fastablate.engines.workflows.sweep import build, grid_axes, make_points

    conf = yaml.safe_load((CONFIGS / f"resnet18-cifar10-{name}.yaml").read_text())
    base = [str(a) for a in conf["base"]]
    command = StudyCommand(base[0])
    tiny = ["--dataset", "synthetic", "--limit", "20", "--epochs", "1", "--batch-size", "10", "--device", "cpu"]
    study, setup, spec = command.values(command.make_context(base[0], base[1:] + tiny))
    points = make_points(study.name, setup, spec, grid_axes(conf["grid"], command.field, study), 1,
                         torch.get_num_threads())
    for point in points:
        build(point)
    return points


@pytest.mark.parametrize("name, count", CONFIG_GRIDS)
def test_experiment_configs_make_their_grids(name, count):
    points = config_points(name)
    assert len(points) == count and len({p["key"] for p in points}) == count
    assert all(p["setup"]["model"] == "resnet18" and p["spec"]["stem"] == "imagenet" and
               p["spec"]["val_fraction"] == 0.1 for p in points)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, _ in CONFIG_GRIDS])
def test_experiment_configs_run(name, hub, tmp_path):
    """The first point of each config's grid runs as its sweep runs it; compare reads it."""
    from fastablate.engines.workflows.sweep import run_point

    point = config_points(name)[0]
    row = run_point(point, str(tmp_path / name))
    assert row["status"] == "complete", row
    folder = tmp_path / name / "points" / point["key"]
    config = json.loads((folder / "run.json").read_text())["config"]
    assert config["model"] == "resnet18" and config["stem"] == "imagenet" and config["val_fraction"] == 0.1
    run("compare", folder, "--out", tmp_path / f"{name}-compare")
    assert len(results(tmp_path / f"{name}-compare")["runs"]) == 1


def test_the_first_saved_layout_is_read_as_its_successful_examples(tmp_path):
    """Sets saved before held every image with a success mask; they count as their successes."""
    old = tmp_path / "old.pt"
    torch.save({"images": torch.zeros(6, 3, 32, 32, dtype=torch.uint8), "labels": torch.arange(6) % 2,
                "success": torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool),
                "classes": [f"class{c}" for c in range(10)]}, old)
    out = tmp_path / "o"
    r = run("train", "--model", "resnet8", *SYN, "--epochs", "1", "--eval-sets", f"old={old}", "--out", out)
    assert "the first --save-dataset layout" in r.stderr and results(out)["eval_sets"]["old"]["n"] == 3


# --- the robust-training protocol's pieces --------------------------------------------------
@pytest.mark.slow
def test_appended_adversarial_data_split_sets_and_scored_checkpoints(saved_sets, tmp_path):
    adv = saved_sets / "adv-train.pt"
    n_adv = len(torch.load(adv, weights_only=True)["labels"])
    out = tmp_path / "app"
    run("train", "--model", "resnet8", *SYN, "--epochs", "1", "--adv-data", adv, "--adv-mode", "append",
        "--out", out)
    assert results(out)["history"][0]["train_accuracy"] >= 0
    assert (out / "plots" / "samples.png").stat().st_size > 5000
    from fastablate.data import build_dataset
    from fastablate.engines.studies.train import TrainSpec, TrainStudy
    train_set = build_dataset("synthetic", None, "train", limit=40)
    data = TrainStudy().data_from(train_set, train_set, TrainSpec(adv_data=str(adv), adv_mode="append"), 0)
    assert len(data.train) == 40 + n_adv and data.adv is None  # each seen once an epoch
    # data split: disjoint, stratified parts
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    r = run("data", "split", adv, "--parts", f"{n_adv // 2},{n_adv - n_adv // 2 - 1}", "--out", f"{a},{b}")
    assert "1 examples of" in r.output
    pa, pb = (torch.load(p, weights_only=True) for p in (a, b))
    assert len(pa["labels"]) == n_adv // 2 and not set(pa["index"].tolist()) & set(pb["index"].tolist())
    info = run("data", "info", a).output
    assert "pgd" in info and "eps=0.1" in info and "synthetic/train" in info
    # eval scores a checkpoint on saved sets beside the dataset
    run("eval", "--weights", out / "model.pt", *SYN, "--eval-sets", f"part-a={a},part-b={b}", "--out", tmp_path / "e")
    doc = results(tmp_path / "e")
    assert doc["eval_sets"]["part-a"]["n"] == len(pa["labels"]) and doc["eval_sets"]["part-b"]["n"] == len(pb["labels"])
    # bad input
    assert "--adv-ratio applies to --adv-mode replace" in error(
        "train", "--model", "resnet8", *SYN, "--adv-data", adv, "--adv-mode", "append", "--adv-ratio", "0.3")
    assert "--adv-mode applies to --adv-data" in error("train", "--model", "resnet8", *SYN, "--adv-mode", "append")
    assert f"asks for {n_adv + 1} examples; the set holds {n_adv}" in error(
        "data", "split", adv, "--parts", f"{n_adv},1", "--out", f"{tmp_path / 'x.pt'},{tmp_path / 'y.pt'}")
    assert "exists; choose another file, or --force" in error("data", "split", adv, "--parts", "1", "--out", a)
    assert "give 2 different files" in error("data", "split", adv, "--parts", "1,1", "--out", tmp_path / "z.pt")
    assert "no such file" in error("eval", "--weights", out / "model.pt", *SYN, "--eval-sets",
                                   f"x={tmp_path / 'none.pt'}", "--out", tmp_path / "e2")
    assert not (tmp_path / "e2").exists()
