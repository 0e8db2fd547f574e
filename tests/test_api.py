"""The Python API on the user's own objects: nn.Module + example inputs + DataLoaders + evaluate()."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import prunepilot
from prunepilot.errors import PrunepilotError, SourceError
from prunepilot.sources.data import load_data, parse_normalize

from tiny_models import ResidualCNN


class GreyResidual(ResidualCNN):
    """The tiny residual CNN on 1-channel Fashion-MNIST images."""

    def __init__(self) -> None:
        super().__init__(c=32)
        self.stem[0] = nn.Conv2d(1, 32, 3, padding=1, bias=False)


@pytest.fixture(scope="module")
def fmnist_loaders():
    """The user's own DataLoaders over real Fashion-MNIST images (their batch size, their shuffling)."""
    bundle = load_data("fashion-mnist", input_shape=(1, 28, 28), seed=0)
    train = DataLoader(Subset(bundle.train, range(512)), batch_size=64, shuffle=True)
    val = DataLoader(Subset(bundle.val, range(256)), batch_size=128)
    return train, val


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    import torch_pruning as tp

    return float(tp.utils.count_ops_and_params(model, x)[0])


def test_one_shot_prune_returns_the_model_in_band_without_files():
    model = GreyResidual().eval()
    x = torch.randn(1, 1, 28, 28)
    dense = _macs(model, x)
    res = prunepilot.prune(model, x, target_macs=0.5, log=None)
    assert isinstance(res, prunepilot.Result)
    assert res.within_band and res.out is None and res.report_path is None
    assert _macs(res.model, x) == pytest.approx(0.5 * dense, rel=0.05)
    assert res.model(x).shape == (1, 10)
    assert res.plan["projected"]["ratios"]


def test_agent_loop_on_user_dataloaders_with_evaluate(tmp_path, fmnist_loaders):
    train, val = fmnist_loaders
    torch.manual_seed(0)  # the near-chance check below needs a random init that is near chance, whatever ran before
    model = GreyResidual().eval()
    x = torch.randn(1, 1, 28, 28)
    calls = []

    def evaluate(m: nn.Module) -> float:  # the user's metric: negative mean loss on their val batches
        calls.append(1)
        with torch.no_grad():
            return -float(sum(nn.functional.cross_entropy(m(xb), yb) for xb, yb in val) / len(val))

    res = prunepilot.prune(model, x, target_macs="50%", train=train, val=val, evaluate=evaluate, agent="uniform",
                           rounds=2, finetune_steps=2, finetune_epochs=0.25, history=False, out=tmp_path / "run",
                           log=None)
    assert res.within_band and res.run_id and res.out == tmp_path / "run"
    assert res.report_path is not None and res.report_path.exists()
    assert res.raw["score_metric"] == "evaluate"
    # the final score is the user's metric on the returned model
    assert res.metrics["score"] == pytest.approx(evaluate(res.model.eval()), abs=1e-6)
    assert len(calls) > 3  # dense, sensitivity, candidates, final
    from prunepilot.journal import Journal

    verdicts = [a.verdict for a in Journal(res.out / "journal.sqlite").attempts(res.run_id)]
    assert verdicts == ["best", "repeat"]  # uniform proposes the same allocation again: not measured twice
    shares = res.raw["time_shares"]
    assert set(shares) == {"prunable_ops", "kept_whole", "other_modules", "outside_modules"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert "of the MAC ratio became real speed-up" in res.raw["speed_explanation"]
    assert "of the MAC ratio became real speed-up" in (res.out / "summary.md").read_text()
    # a random-weight model is near chance on real data: the run says so loudly
    assert any("near chance" in w for w in res.raw["warnings"])


def test_resume_refuses_a_changed_model(tmp_path, fmnist_loaders):
    train, val = fmnist_loaders
    model = GreyResidual().eval()
    x = torch.randn(1, 1, 28, 28)
    kw = dict(target_macs=0.5, train=train, val=val, agent="uniform", rounds=1, finetune_steps=1,
              finetune_epochs=0.1, history=False, out=tmp_path / "run", log=None)
    prunepilot.prune(model, x, **kw)
    again = prunepilot.prune(model, x, resume=True, **kw)  # the same model: the journaled run finishes again
    assert again.within_band
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(PrunepilotError, match="not the model the run started with"):
        prunepilot.prune(model, x, resume=True, **kw)


class TwoInputNet(nn.Module):
    """A model whose forward takes two named tensors and returns a dict (HF-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(12, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(6, 128), nn.ReLU())
        self.head = nn.Linear(128, 3)

    def forward(self, image_feats, meta):
        return {"logits": self.head(self.a(image_feats) + self.b(meta))}


def test_dict_batches_multi_input_and_dict_outputs(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 12, generator=g), torch.randn(256, 6, generator=g)
    y = (a[:, 0] + b[:, 0] > 0).long() + (a[:, 1] > 1).long()
    ds = [{"image_feats": a[i], "meta": b[i], "labels": y[i]} for i in range(256)]
    train = DataLoader(ds, batch_size=32, shuffle=True)
    val = DataLoader(ds[:128], batch_size=64)
    model = TwoInputNet().eval()
    example = {"image_feats": a[:1], "meta": b[:1]}
    res = prunepilot.prune(model, example, target_params=0.6, train=train, val=val, agent="uniform", rounds=1,
                           finetune_steps=3, finetune_epochs=0.5, history=False, out=tmp_path / "run", log=None)
    assert res.within_band
    assert res.raw["score_metric"] == "top1" and 0.0 <= res.metrics["accuracy"] <= 1.0
    out = res.model(**example)
    assert out["logits"].shape == (1, 3)


def test_bad_api_input_gets_clear_errors(fmnist_loaders):
    train, val = fmnist_loaders
    model, x = GreyResidual(), torch.randn(1, 1, 28, 28)
    with pytest.raises(PrunepilotError, match="nn.Module"):
        prunepilot.prune("torchvision:resnet18", x, target_macs=0.5)
    with pytest.raises(PrunepilotError, match="at least one tensor"):
        prunepilot.prune(model, [1, 2], target_macs=0.5)
    with pytest.raises(PrunepilotError, match="a budget needs at least one target"):
        prunepilot.prune(model, x)
    with pytest.raises(PrunepilotError, match="candidates need a score"):
        prunepilot.prune(model, x, target_macs=0.5, train=train)
    with pytest.raises(PrunepilotError, match="an agent needs data"):
        prunepilot.prune(model, x, target_macs=0.5, agent="uniform")
    with pytest.raises(SourceError, match="must be an iterable of batches"):
        prunepilot.prune(model, x, target_macs=0.5, train=torch.zeros(3), val=val)
    with pytest.raises(SourceError, match="no usable CUDA|--device is"):
        if torch.cuda.is_available():
            raise SourceError("--device is", "", "")
        prunepilot.prune(model, x, target_macs=0.5, device="cuda")
    with pytest.raises(SourceError, match="--dtype is"):
        prunepilot.prune(model, x, target_macs=0.5, dtype="int3")


def test_dtype_plumbing_on_cpu():
    model = GreyResidual().eval()
    x = torch.randn(1, 1, 28, 28)
    res = prunepilot.prune(model, x, target_macs=0.5, dtype="bfloat16", device="cpu", log=None)
    assert res.within_band
    assert next(res.model.parameters()).dtype == torch.bfloat16
    assert res.model(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_normalize_options():
    assert parse_normalize("imagenet").normalization.mean == (0.485, 0.456, 0.406)
    assert parse_normalize("none").normalization.std == (1.0,)
    user = parse_normalize("0.5/0.4/0.3,0.2/0.2/0.2", resize=256)
    assert user.normalization.mean == (0.5, 0.4, 0.3) and user.resize == 256 and user.source == "user"
    assert parse_normalize("auto").normalization is None  # no model: the data source's default
    for bad in ("0.5", "a,b", "0.5,0", "0.1/0.2,0.3"):
        with pytest.raises(SourceError, match="--normalize"):
            parse_normalize(bad)
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    auto = parse_normalize("auto", model=vit)
    assert auto.source == "timm data config" and auto.normalization.mean == pytest.approx((0.5, 0.5, 0.5))
    assert auto.resize == 248 and auto.crop == 224  # 224 / crop_pct 0.9


def test_normalize_changes_what_the_model_sees():
    raw = load_data("fashion-mnist", input_shape=(1, 28, 28), preprocess=parse_normalize("none"))
    std = load_data("fashion-mnist", input_shape=(1, 28, 28))
    x_raw, x_std = raw.train[0][0], std.train[0][0]
    assert 0.0 <= float(x_raw.min()) and float(x_raw.max()) <= 1.0  # pixels in [0, 1], unnormalised
    assert torch.allclose((x_raw - 0.2860) / 0.3530, x_std, atol=1e-5)
    big = load_data("fashion-mnist", input_shape=(3, 32, 32), preprocess=parse_normalize("imagenet", resize=40))
    assert big.train[0][0].shape == (3, 32, 32)  # grey -> RGB, shorter side 40, centre crop 32


def test_labels_free_batches_rank_by_agreement(tmp_path):
    """Unlabelled batches: recovery distils from the dense model and candidates rank by agreement with it."""
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(128, 1, 28, 28, generator=g)
    train = DataLoader(TensorDataset(xs), batch_size=32)
    model = GreyResidual().eval()
    res = prunepilot.prune(model, xs[:1], target_macs=0.6, train=train, val=train, agent="uniform", rounds=1,
                           finetune_steps=2, finetune_epochs=0.25, history=False, out=tmp_path / "run", log=None)
    assert res.raw["score_metric"] == "agreement"
    assert 0.0 <= res.metrics["fidelity_agreement"] <= 1.0


def test_dynamic_int8_says_it_is_a_cpu_format():
    from prunepilot.errors import PlanError
    from prunepilot.jobs.quantize import _check_device, default_layers

    with pytest.raises(PlanError, match="CPU format"):
        _check_device("cuda", "eager", "int8_dynamic")
    with pytest.raises(PlanError, match="CPU format"):
        _check_device("cuda:0", "torchao", "int8_dynamic")
    assert _check_device(None, "eager", "int8_dynamic") == "cpu"
    assert default_layers("onnx") == "all" and default_layers("eager") == "auto"


def test_quantize_api_returns_the_quantized_module():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(4, 64)
    res = prunepilot.quantize(model, x, layers="all", rounds=2)
    assert res.out is None and res.metrics["size_mb"] < res.dense["size_mb"]
    assert torch.allclose(res.model(x), model(x), atol=0.2)
    assert any("Quantized" in type(m).__name__ or "quantized" in type(m).__module__ for m in res.model.modules())


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                    image_size=32, patch_size=8, num_channels=3, num_labels=5)
    torch.manual_seed(0)
    return ViTForImageClassification(cfg).eval()


def _hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def test_hf_vit_from_config_with_dict_batches(tmp_path):
    """A Hugging Face ViT: keyword inputs (pixel_values), a ModelOutput with .logits, dict batches."""
    model = _hf_vit()
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(96, 3, 32, 32, generator=g), torch.randint(0, 5, (96,), generator=g)
    batches = DataLoader([{"pixel_values": xs[i], "labels": ys[i]} for i in range(96)], batch_size=32)
    example = {"pixel_values": xs[:1]}
    res = prunepilot.prune(model, example, target_macs=0.6, train=batches, val=batches, agent="uniform", rounds=1,
                           finetune_steps=2, finetune_epochs=0.34, history=False, out=tmp_path / "vit", log=None)
    assert res.within_band, res.raw["errors"]
    assert res.model(**example).logits.shape == (1, 5)


def test_hf_bert_encoder_with_token_inputs():
    """A BERT-style encoder: integer input_ids + attention_mask passed as keywords; one projected plan."""
    model = _hf_bert()
    ids = torch.randint(0, 512, (1, 16))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = prunepilot.prune(model, example, target_macs=0.6, log=None)
    assert res.within_band, res.raw["errors"]
    assert res.model(**example).logits.shape == (1, 2)


def test_history_warm_start_for_prune_is_journaled_and_kept_on_resume(tmp_path):
    """A finished prune run is recorded; the next run on the same architecture proposes its best shape first
    (attempt 0, strategist 'history'), and what the store gave a run sits in its journaled config."""
    from prunepilot.history import SEED_KEY
    from prunepilot.journal import Journal

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 12, generator=g), torch.randn(128, 6, generator=g)
    y = (a[:, 0] + b[:, 0] > 0).long()
    ds = [{"image_feats": a[i], "meta": b[i], "labels": y[i]} for i in range(128)]
    loader = DataLoader(ds, batch_size=32)
    example = {"image_feats": a[:1], "meta": b[:1]}
    store = tmp_path / "history.sqlite"
    kw = dict(train=loader, val=loader, agent="uniform", rounds=2, finetune_steps=1, finetune_epochs=0.1,
              history=store, log=None)
    first = prunepilot.prune(TwoInputNet().eval(), example, target_params=0.6, out=tmp_path / "a", **kw)
    second = prunepilot.prune(TwoInputNet().eval(), example, target_params=0.55, out=tmp_path / "b", **kw)
    j = Journal(tmp_path / "b" / "journal.sqlite")
    seed = j.run(second.run_id)["config"][SEED_KEY]
    assert seed["from_run"] == first.run_id and seed["priors"][0]["budget"]["params"] == pytest.approx(0.6)
    attempts = j.attempts(second.run_id)
    assert attempts[0].strategist == "history" and attempts[0].plan["source"] == "history"
    assert all(x.strategist == "uniform" for x in attempts[1:])
    cold = prunepilot.prune(TwoInputNet().eval(), example, target_params=0.55, out=tmp_path / "c",
                            **(kw | {"history": False}))
    c = Journal(tmp_path / "c" / "journal.sqlite")
    assert c.run(cold.run_id)["config"][SEED_KEY]["warm_start"] is None
    assert all(x.strategist == "uniform" for x in c.attempts(cold.run_id))


def test_regression_targets_score_by_mse_and_warn_when_no_better_than_the_mean(tmp_path):
    """Float targets: recovery uses MSE and candidates rank by -MSE (top-1 would crash on them); a dense model no
    better than predicting the mean gets the loud warning, the regression analogue of near chance."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(256, 10, generator=g)
    ys = xs[:, :3].sum(1, keepdim=True).sin()
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = ((model(xs) - ys) ** 2).mean()
        loss.backward()
        opt.step()
    loader = DataLoader(TensorDataset(xs, ys), batch_size=64)
    res = prunepilot.prune(model, xs[:2], target_macs=0.5, train=loader, val=loader, agent="uniform", rounds=1,
                           finetune_steps=5, finetune_epochs=0.25, history=False, out=tmp_path / "run", log=None)
    assert res.within_band and res.raw["score_metric"] == "neg_mse"
    assert res.metrics["score"] == pytest.approx(-res.metrics["mse"])
    assert res.metrics["mse"] < float(ys.var())  # still far better than the mean after pruning and recovery
    assert not any("no better than always predicting" in w for w in res.raw.get("warnings", []))
    untrained = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))
    lines: list[str] = []
    res = prunepilot.prune(untrained, xs[:2], target_macs=0.5, train=loader, val=loader, agent="uniform", rounds=1,
                           finetune_steps=0, finetune_epochs=0, history=False, log=lines.append)
    assert any("no better than always predicting the targets' mean" in w for w in res.raw["warnings"])
    # no out=: every line naming the temporary folder says it goes when the call returns
    assert any("(journal" in s and "temporary folder" in s for s in lines)


def test_top1_on_float_targets_is_a_clear_error():
    from prunepilot.evaluate.classification import evaluate_classifier

    loader = [(torch.randn(4, 3), torch.randn(4, 1))]
    with pytest.raises(PrunepilotError, match="integer class labels"):
        evaluate_classifier(nn.Linear(3, 2), loader)


def test_runs_commands_refuse_a_missing_journal_and_a_python_run_before_writing(tmp_path):
    from typer.testing import CliRunner

    from prunepilot.cli import app

    runner = CliRunner()
    missing = tmp_path / "nowhere" / "journal.sqlite"
    res = runner.invoke(app, ["runs", "list", "--journal", str(missing)])
    assert res.exit_code != 0 and "no journal at this path" in str(res.exception) and not missing.exists()
    model, x = GreyResidual().eval(), torch.randn(4, 1, 28, 28)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 10, (4,))), batch_size=4)
    run = prunepilot.prune(model, x[:1], target_macs=0.6, train=loader, val=loader, agent="uniform", rounds=1,
                           finetune_steps=0, finetune_epochs=0, history=False, out=tmp_path / "run", log=None)
    res = runner.invoke(app, ["runs", "replay", run.run_id, "--journal", str(tmp_path / "run" / "journal.sqlite")])
    assert res.exit_code != 0 and "handed in from Python" in str(res.exception)
    assert not (tmp_path / "run-replay").exists()  # refused before the replay folder was made


def test_labels_beyond_the_models_outputs_are_refused_before_pruning():
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))
    loader = DataLoader(TensorDataset(torch.randn(32, 12), torch.arange(32) % 10), batch_size=8)
    with pytest.raises(PrunepilotError, match="labels exceed the model's outputs"):
        prunepilot.prune(model, torch.randn(1, 12), target_macs=0.5, train=loader, val=loader, rounds=1,
                         history=False, log=None)
