"""The four method scripts end to end on a tiny configuration (the runs of conftest's smoke
chain, each trained once per test session), and their defaults."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from training import harness
from training import losses
from config import parse_script, run_name
from helpers import REPO, SMOKE_RUNS, LinearModel, RecordingModel, TinyCNN, right_aligned_masks, run_script
from reproduce import SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("method", SMOKE_RUNS)
def test_script_runs_end_to_end_and_leaves_every_file(smoke_chain, method):
    root, first, _ = smoke_chain
    run = root / "result" / "smoke" / SMOKE_RUNS[method]
    assert f"({run.name}): done in" in first.stdout  # its script ended with status 0
    for path in ("config.json", "history.json", "curves.png", "model.pt", "checkpoints/last.pt",
                 "checkpoints/epoch_001.pt", "eval_test.json", "eval_test.md", "confusion_test.png",
                 "robustness_test.json", "robustness_test.csv", "robustness_test.png"):
        assert (run / path).is_file(), path
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    sweeps = json.loads((run / "robustness_test.json").read_text())["sweeps"]
    assert set(sweeps) == {"white", "pgd_linf"}
    assert sweeps["pgd_linf"]["levels"] == [0, 0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1]  # the paper's


@pytest.mark.slow
@pytest.mark.parametrize("method,keys", [("NSR", {"loss_mse", "loss_margin", "loss_nsr"}),
                                         ("jacob", {"loss_ce", "loss_jacobian"}),
                                         ("advls", {"loss_ce", "loss_adv"})])
def test_extra_terms_are_logged_when_they_apply(smoke_chain, method, keys):
    """The smoke preset starts the NSR and adversarial terms at epoch 0, so they show in the
    history from the first epoch on."""
    root, _, _ = smoke_chain
    history = json.loads((root / "result" / "smoke" / SMOKE_RUNS[method] / "history.json").read_text())
    assert keys <= set(history[0]), method


def test_run_names_carry_the_key_settings():
    adv = SCRIPTS["advls"]
    assert run_name(parse_script(adv, argv=["--eps", "0.05", "--label_smoothing", "0.1"])) == \
        "advls_eps_0.05_beta_0.5_ls_0.1"
    assert run_name(parse_script(adv, argv=[])) == "advls_eps_0.01_beta_0.5"
    jacob = SCRIPTS["jacob"]
    assert run_name(parse_script(jacob, argv=["--jacobian_projections", "1"])) == "jacob_beta_44_proj_1"
    assert run_name(parse_script(jacob, argv=["--jacobian_projections", "1", "--run_name", "mine"])) == "mine"
    assert run_name(parse_script(SCRIPTS["NSR"], argv=["--beta2", "0.5"])) == "NSR_beta1_1_beta2_0.5"
    assert run_name(parse_script(SCRIPTS["CE"], argv=[])) == "CE"


def test_a_large_weight_makes_a_valid_run_name(tmp_path, capsys):
    """NSR's weights have no upper bound: 1e20 gives the run name NSR_beta1_1_beta2_1e+20, which
    passes the run-name check; what stops this run is its missing data."""
    nsr = SCRIPTS["NSR"]
    status = harness.main(nsr, argv=["--result_dir", str(tmp_path), "--data_dir", str(tmp_path / "none"),
                                     "--beta2", "1e20"])
    assert status == 2 and capsys.readouterr().err.startswith(f"error: no preprocessed CPSC2018 cache in {tmp_path / 'none'}")


def test_jacobian_term_starts_at_its_epoch():
    jacob = SCRIPTS["jacob"]
    cfg = parse_script(jacob, ["--reg_start_epoch", "2", "--beta", "3"])
    torch.manual_seed(0)
    model = TinyCNN(leads=2, classes=9)
    x, y, mask = torch.randn(2, 2, 64), torch.tensor([0, 5]), torch.ones(2, 1, 64)
    ce = F.cross_entropy(model(x, mask), y)
    before, parts = jacob.loss_fn(model, x, y, mask, 1, cfg)
    assert before.item() == ce.item() and set(parts) == {"loss_ce"}
    after, parts = jacob.loss_fn(model, x, y, mask, 2, cfg)
    term = losses.jacobian_loss(model, x, mask, 0)
    assert after.item() == pytest.approx(ce.item() + 3 * term.item(), rel=1e-5) and term.item() > 0


def test_method_defaults_follow_the_paper():
    nsr = SCRIPTS["NSR"].HYPERPARAMETERS
    assert (nsr["beta1"], nsr["beta2"], nsr["reg_start_epoch"]) == (1.0, 1.0, 10)
    jacob = SCRIPTS["jacob"].HYPERPARAMETERS
    assert (jacob["beta"], jacob["jacobian_projections"], jacob["reg_start_epoch"]) == (44.0, 0, 0)
    adv = SCRIPTS["advls"].HYPERPARAMETERS
    assert (adv["eps"], adv["beta"], adv["adv_start_epoch"], adv["pgd_steps"], adv["pgd_alpha"],
            adv["label_smoothing"]) == (0.01, 0.5, 10, 20, 4.0, 0.0)


@pytest.mark.parametrize("flags,message", [
    (["--pgd_steps", "0"], "--pgd_steps must be at least 1, got 0"),
    (["--label_smoothing", "2"], "--label_smoothing must be between 0 and 1, got 2"),
    (["--beta", "1.5"], "--beta must be between 0 and 1, got 1.5"),
    (["--eps", "1e30"], "--eps must be between 0 and 1, got 1e+30"),
])
def test_adversarial_hyperparameters_that_cannot_train_are_refused(tmp_path, capsys, flags, message):
    adv = SCRIPTS["advls"]
    status = harness.main(adv, argv=["--result_dir", str(tmp_path), *flags])
    assert status == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags,message", [
    (["--eps", "inf"], "error: --eps must be a finite non-negative number, got inf"),
    (["--pgd_steps", "0"], "error: --pgd_steps must be at least 1, got 0"),
    (["--device", "mps"], "error: --device mps: MPS is not available on this machine"),
])
def test_the_script_ends_bad_flags_with_one_line(tmp_path, flags, message):
    status, out, err = run_script(REPO / "CPSC2018_CNN_ce_adv_pgd_ls.py", "--result_dir", str(tmp_path), *flags)
    assert (status, err.strip(), out) == (2, message, "")


@pytest.fixture
def linear_model() -> LinearModel:
    """A stand-in for the CNN on 8-lead, 32-sample inputs (fast, differentiable in x)."""
    return LinearModel(torch.randn(9, 8, 32, generator=torch.Generator().manual_seed(0)) / 32)


@pytest.mark.parametrize("epoch,all_wrong", [(0, False), (9, False), (20, True)])
def test_adversarial_loss_keeps_its_weights_without_an_adversarial_term(linear_model, epoch, all_wrong):
    """Pins fix 1 (the original's loss): (1 - beta) * CE before adv_start_epoch and in a batch
    with no correct sample, where this code used to return the bare CE (twice the gradient)."""
    adv = SCRIPTS["advls"]
    cfg = SimpleNamespace(**adv.HYPERPARAMETERS, epochs=70)
    model = linear_model
    x, mask = torch.rand(4, 8, 32) * 2 - 1, torch.ones(4, 1, 32)
    with torch.no_grad():
        predicted = model(x, mask).argmax(dim=1)
    y = (predicted + 1) % 9 if all_wrong else predicted
    loss, logged = adv.loss_fn(model, x, y, mask, epoch, cfg)
    assert loss.item() == pytest.approx((1 - cfg.beta) * F.cross_entropy(model(x, mask), y).item())
    assert logged["loss_adv"] == 0.0


def test_adversarial_loss_weighs_both_terms_once_attacks_start(linear_model):
    """From adv_start_epoch on, with correct samples, both terms: the loss exceeds (1 - beta) * CE
    by beta times a positive adversarial term."""
    adv = SCRIPTS["advls"]
    cfg = SimpleNamespace(**{**adv.HYPERPARAMETERS, "pgd_steps": 2}, epochs=70)
    model = linear_model
    x, mask = torch.rand(4, 8, 32) * 2 - 1, torch.ones(4, 1, 32)
    with torch.no_grad():
        y = model(x, mask).argmax(dim=1)
    loss, logged = adv.loss_fn(model, x, y, mask, 30, cfg)
    clean = F.cross_entropy(model(x, mask), y).item()
    assert logged["loss_adv"].item() > 0
    assert loss.item() == pytest.approx((1 - cfg.beta) * clean + cfg.beta * logged["loss_adv"].item())


# --- the baselines beyond the paper: TRADES and fast adversarial training ------------------------

def test_baseline_defaults_follow_their_papers():
    trades = SCRIPTS["trades"].HYPERPARAMETERS
    assert (trades["beta"], trades["pgd_steps"], trades["pgd_alpha"] / trades["pgd_steps"]) == (6.0, 10, 0.25)
    fast = SCRIPTS["fast_adv"].HYPERPARAMETERS
    assert (fast["fgsm_alpha"], fast["eps"], fast["beta"], fast["adv_start_epoch"]) == (1.25, 0.01, 0.5, 10)
    assert run_name(parse_script(SCRIPTS["trades"], argv=[])) == "trades_eps_0.01_beta_6"
    assert run_name(parse_script(SCRIPTS["fast_adv"], argv=["--noise_sd", "0.1"])) == "fast_adv_eps_0.01_beta_0.5_noise_0.1"
    assert run_name(parse_script(SCRIPTS["fast_adv"], argv=["--wong_loss", "1"])) == "fast_adv_eps_0.01_beta_0.5_wong_1"
    assert run_name(parse_script(SCRIPTS["CE"], argv=["--noise_sd", "0.25"])) == "CE_noise_0.25"


@pytest.mark.parametrize("method,flags,message", [
    ("trades", ["--pgd_steps", "0"], "--pgd_steps must be at least 1, got 0"),
    ("trades", ["--eps", "2"], "--eps must be between 0 and 1, got 2"),
    ("trades", ["--beta", "-1"], "--beta must be a finite non-negative number, got -1.0"),
    ("fast_adv", ["--overfit_drop", "1.5"], "--overfit_drop must be between 0 and 1, got 1.5"),
    ("fast_adv", ["--guard_pgd_steps", "0"], "--guard_pgd_steps must be at least 1, got 0"),
    ("fast_adv", ["--wong_loss", "2"], "--wong_loss must be 0 (the paper's loss mix) or 1 (Wong et al.'s loss), got 2"),
    ("fast_adv", ["--fgsm_alpha", "nan"], "--fgsm_alpha must be a finite non-negative number, got nan"),
])
def test_baseline_hyperparameters_that_cannot_train_are_refused(tmp_path, capsys, method, flags, message):
    status = harness.main(SCRIPTS[method], argv=["--result_dir", str(tmp_path), *flags])
    assert status == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert not any(tmp_path.iterdir())


def test_trades_loss_is_ce_then_ce_plus_beta_times_the_kl_of_its_attack(linear_model):
    trades = SCRIPTS["trades"]
    cfg = SimpleNamespace(**{**trades.HYPERPARAMETERS, "pgd_steps": 3}, epochs=70)
    x, mask = torch.rand(4, 8, 32) * 2 - 1, torch.ones(4, 1, 32)
    y = torch.tensor([0, 3, 5, 8])
    ce = F.cross_entropy(linear_model(x, mask), y)
    before, parts = trades.loss_fn(linear_model, x, y, mask, 9, cfg)
    assert before.item() == ce.item() and parts["loss_kl"] == 0.0
    torch.manual_seed(0)
    after, parts = trades.loss_fn(linear_model, x, y, mask, 69, cfg)
    torch.manual_seed(0)
    x_adv = losses.trades_attack(linear_model, x, mask, cfg.eps, cfg.eps / 4 * 10 / 3, 3)  # 2.5 eps / 3
    kl = losses.trades_kl(linear_model(x, mask), linear_model(x_adv, mask)) / 4
    assert parts["loss_kl"].item() == pytest.approx(kl.item(), rel=1e-5) and kl.item() > 0
    assert after.item() == pytest.approx(ce.item() + 6 * kl.item(), rel=1e-5)


def test_fast_adv_guard_is_pgd_accuracy_at_eps_from_its_start_epoch(trained_tiny):
    """None before adversarial training; at eps 0 the clean accuracy; at a large eps below it; the
    same at every call (its random start is seeded); the model's mode restored."""
    fast_adv = SCRIPTS["fast_adv"]
    model, x, y, mask = trained_tiny
    cfg = SimpleNamespace(**fast_adv.HYPERPARAMETERS)
    assert fast_adv.guard(model, x, y, mask, 9, cfg) is None
    clean = (model(x, mask).argmax(dim=1) == y).float().mean().item()
    assert fast_adv.guard(model, x, y, mask, 10, SimpleNamespace(**{**vars(cfg), "eps": 0.0})) == clean
    model.train()
    try:
        attacked = fast_adv.guard(model, x, y, mask, 10, SimpleNamespace(**{**vars(cfg), "eps": 0.3}))
        assert model.training and attacked < clean - 0.2
        assert fast_adv.guard(model, x, y, mask, 10, SimpleNamespace(**{**vars(cfg), "eps": 0.3})) == attacked
    finally:
        model.eval()


def fgsm_from_a_uniform_start(weight, x, y, mask, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, adversarial input) of FGSM-RS on the linear model of ``weight``, computed by hand from
    torch's global RNG seeded 0: a uniform start in the eps ball on the signal, then one step of
    1.25 eps along the sign of the CE gradient sum_k (p_k - onehot_k) W_k * mask, projected and clipped."""
    torch.manual_seed(0)
    start = (x + eps * (2 * torch.rand(x.shape, dtype=torch.float64) - 1) * mask).clamp(-1, 1)
    p = F.softmax(torch.einsum("blt,klt->bk", start * mask, weight), dim=1)
    gradient = torch.einsum("bk,klt->blt", p - F.one_hot(y, 9).double(), weight) * mask
    return start, (x + (start - x + 1.25 * eps * gradient.sign() * mask).clamp(-eps, eps)).clamp(-1, 1)


def test_fast_adversarial_step_is_fgsm_from_a_uniform_start_on_a_linear_model():
    """fast_adv's adversarial input, rebuilt independently on a linear model (whose CE gradient in x
    is sum_k (p_k - onehot_k) W_k * mask): a uniform start in the eps ball on the signal, then one
    step of 1.25 eps along the sign of that gradient, projected onto the ball and clipped."""
    fast_adv = SCRIPTS["fast_adv"]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(9, 2, 40, generator=g, dtype=torch.float64) / 10
    model = RecordingModel(LinearModel(weight))
    mask = right_aligned_masks([40, 25, 10], 40, torch.float64)
    x = (0.98 * (2 * torch.rand(3, 2, 40, generator=g, dtype=torch.float64) - 1)) * mask  # some near +-1
    with torch.no_grad():
        y = model(x, mask).argmax(dim=1)  # every sample correct: all are attacked
    cfg = SimpleNamespace(**fast_adv.HYPERPARAMETERS, epochs=70)
    torch.manual_seed(0)
    fast_adv.loss_fn(model, x, y, mask, 69, cfg)  # the last epoch: eps_t = eps
    eps = cfg.eps
    start, expected = fgsm_from_a_uniform_start(weight, x, y, mask, eps)
    clean, attack_start, adversarial = model.iterates  # the clean pass, the FGSM step's pass, the trained-on pass
    torch.testing.assert_close(attack_start, start)
    torch.testing.assert_close(adversarial, expected)
    delta = adversarial - x
    assert delta.abs().max() <= eps + 1e-12 and (delta * (1 - mask)).abs().max() == 0


def test_wongs_loss_is_ce_on_every_samples_fgsm_input_without_a_clean_pass():
    """--wong_loss 1: the same FGSM input (rebuilt as above) for every sample, right or wrong, and the
    loss is its mean CE alone: two passes, the FGSM step's and the trained-on one."""
    fast_adv = SCRIPTS["fast_adv"]
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(9, 2, 40, generator=g, dtype=torch.float64) / 10
    model = RecordingModel(LinearModel(weight))
    mask = right_aligned_masks([40, 25, 10], 40, torch.float64)
    x = (2 * torch.rand(3, 2, 40, generator=g, dtype=torch.float64) - 1) * mask
    with torch.no_grad():
        y = (model(x, mask).argmax(dim=1) + torch.tensor([0, 1, 2])) % 9  # two samples misclassified
    model.iterates.clear()
    cfg = SimpleNamespace(**{**fast_adv.HYPERPARAMETERS, "wong_loss": 1}, epochs=70)
    torch.manual_seed(0)
    loss, parts = fast_adv.loss_fn(model, x, y, mask, 69, cfg)
    eps = cfg.eps
    start, expected = fgsm_from_a_uniform_start(weight, x, y, mask, eps)
    attack_start, adversarial = model.iterates  # no clean pass
    torch.testing.assert_close(attack_start, start)
    torch.testing.assert_close(adversarial, expected)
    logits = torch.einsum("blt,klt->bk", expected * mask, weight)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    assert set(parts) == {"loss_adv", "eps_t"} and parts["eps_t"] == eps
    model.iterates.clear()
    loss, _ = fast_adv.loss_fn(model, x, y, mask, 0, cfg)  # before the adversarial start: plain CE
    torch.testing.assert_close(loss, F.cross_entropy(torch.einsum("blt,klt->bk", x * mask, weight), y))
    assert len(model.iterates) == 1


@pytest.mark.slow  # two tiny trainings end to end
@pytest.mark.parametrize("method,terms", [("trades", {"loss_ce", "loss_kl"}), ("fast_adv", {"loss_ce", "loss_adv"})])
def test_baseline_scripts_train_and_evaluate_end_to_end(tiny_cache, tmp_path, method, terms):
    """The smoke chain runs the paper's methods only (CI time); the baselines run here at tiny size,
    their terms active from epoch 0, the fast AT guard scoring each epoch."""
    status = harness.main(SCRIPTS[method], argv=[
        "--data_dir", str(tiny_cache), "--result_dir", str(tmp_path), "--max_length", "2048", "--random_pad", "1024",
        "--batch_size", "8", "--eval_batch_size", "18", "--epochs", "2", "--max_batches", "1", "--sweeps", "",
        "--adv_start_epoch", "0", "--run_name", "run", *(["--pgd_steps", "2"] if method == "trades" else [])])
    assert status == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 2 and terms <= set(history[0])
    if method == "fast_adv":
        assert all(0 <= h["guard_accuracy"] <= 1 for h in history)
    assert (tmp_path / "run" / "eval_test.json").is_file()
