"""Settings: one place for presets, flag types declared rather than taken from the defaults."""
import dataclasses

import pytest

import config
import reproduce
from helpers import PAPER_TRAINING
from plumbing.flags import ConfigError


def test_editing_a_default_does_not_change_what_its_flag_accepts():
    assert config.parse_config("jacob", {"beta": 44}, argv=["--beta", "0.5"], training=PAPER_TRAINING).beta == 0.5
    assert config.parse_config("CE", {}, argv=["--lr", "1"], training={**PAPER_TRAINING, "lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="invalid int value"):
        config.parse_config("advls", {"pgd_steps": 20.0}, argv=["--pgd_steps", "2.5"], training=PAPER_TRAINING,
                            whole_numbers=("pgd_steps",))


@pytest.mark.parametrize("flag, value", [("--resume", True), ("--no_resume", False), ("--no-resume", False),
                                         ("--overwrite", True), ("--no_overwrite", False), ("--no-overwrite", False),
                                         ("--no_cudnn_benchmark", False), ("--no-cudnn-benchmark", False),
                                         ("--no-cudnn_benchmark", False)])
def test_an_on_off_setting_takes_every_spelling(flag, value):
    name = flag.removeprefix("--").removeprefix("no").lstrip("_-").replace("-", "_")
    cfg = config.parse_config("CE", {name: not value}, argv=[flag], training=PAPER_TRAINING)
    assert getattr(cfg, name) is value


def test_a_default_is_read_as_its_flag_would_read_it():
    cfg = config.parse_config("jacob", {"beta": 44, "reg_start_epoch": 4.0}, argv=[],
                              training={**PAPER_TRAINING, "batch_size": 64.0}, whole_numbers=("reg_start_epoch",))
    assert (cfg.beta, cfg.reg_start_epoch, cfg.batch_size) == (44.0, 4, 64)
    assert (type(cfg.beta), type(cfg.reg_start_epoch), type(cfg.batch_size)) == (float, int, int)
    with pytest.raises(ConfigError, match=r"batch_size = 64\.5: --batch_size takes a whole number"):
        config.parse_config("CE", {}, argv=[], training={**PAPER_TRAINING, "batch_size": 64.5})
    with pytest.raises(ConfigError, match=r"^CE: TRAINING must set exactly epochs, batch_size, lr \(it sets epochs\)$"):
        config.parse_config("CE", {}, argv=[], training={"epochs": 70})
    with pytest.raises(ConfigError, match=r"beta = '0\.5': --beta takes a number"):
        config.parse_config("jacob", {"beta": "0.5"}, argv=[], training=PAPER_TRAINING)


def test_the_scripts_show_the_shared_settings_of_the_protocol():
    for method, script in reproduce.SCRIPTS.items():
        assert script.TRAINING == PAPER_TRAINING, method


def test_every_preset_setting_belongs_to_a_method_or_the_shared_settings():
    hyperparameters = {method: script.HYPERPARAMETERS for method, script in reproduce.SCRIPTS.items()}
    known = set(config.TRAIN_DEFAULTS).union(config.SCRIPT_SETTINGS, *hyperparameters.values())
    for name, preset in ((name, p.settings) for name, p in config.PRESETS.items()):
        assert set(preset) - set(config.METHODS) <= known, (name, set(preset) - known)
        for method in set(preset) & set(config.METHODS):  # a method's section: its own settings
            own = set(config.TRAIN_DEFAULTS) | set(config.SCRIPT_SETTINGS) | set(hyperparameters[method])
            assert set(preset[method]) <= own, (name, method, set(preset[method]) - own)


def test_a_method_section_of_a_preset_applies_to_that_method_only(monkeypatch):
    monkeypatch.setitem(config.PRESETS, "test", dataclasses.replace(
        config.PRESETS["paper"], settings=dict(epochs=3, beta=2.0, jacob=dict(beta=0.5, epochs=4))))
    jacob = config.parse_config("jacob", {"beta": 44.0}, ["--preset", "test"], training=PAPER_TRAINING)
    advls = config.parse_config("advls", {"beta": 0.5}, ["--preset", "test"], training=PAPER_TRAINING)
    assert (jacob.beta, jacob.epochs) == (0.5, 4)
    assert (advls.beta, advls.epochs) == (2.0, 3)
    flags = ["--preset", "test", "--beta", "7"]
    assert config.parse_config("jacob", {"beta": 44.0}, flags, training=PAPER_TRAINING).beta == 7.0


def test_a_preset_means_the_same_through_the_script_and_reproduce():
    """Every setting of every run of every preset: `--preset P` in a method script resolves as
    reproduce.py --preset P does, but for the setting reproduce's grid varies."""
    for preset in config.PRESETS:
        jobs = reproduce.plan_jobs(preset, list(config.METHODS), baselines=True)
        plan = config.PRESETS[preset]
        assert {job.method for job in jobs} == \
            ({method for method, _, _ in plan.grid} if plan.selection else set(config.METHODS)), preset
        for job in jobs:
            module = reproduce.SCRIPTS[job.method]
            direct = vars(config.parse_script(module, argv=["--preset", preset]))
            through_reproduce = vars(job.cfg)
            assert direct.keys() == through_reproduce.keys(), (preset, job.method)
            differ = {key: (direct[key], through_reproduce[key]) for key in direct
                      if key != job.varied and direct[key] != through_reproduce[key]}
            assert not differ, (preset, job.method, differ)
    demo = reproduce.plan_jobs("demo", list(config.METHODS))
    jacob, advls, nsr = (next(job for job in demo if job.method == m) for m in ("jacob", "advls", "NSR"))
    assert jacob.cfg.jacobian_projections == 1 and advls.cfg.pgd_steps == 5
    assert nsr.cfg.batch_size == config.PRESETS["demo"].settings["NSR"]["batch_size"] != advls.cfg.batch_size


def test_level_lists_are_the_papers_by_default_and_extended_on_request():
    paper = {"pgd_linf": (0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1), "pgd_l2": (1, 3, 5, 10, 15, 20, 25, 30),
             "white": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)}
    assert config.parse_config("CE", {}, argv=[], training=PAPER_TRAINING).levels == "paper"
    for sweep, levels in paper.items():
        assert config.noise_levels(sweep) == levels
    assert config.noise_levels("pgd_linf", "extended") == paper["pgd_linf"] + (0.2, 0.3)
    assert config.noise_levels("pgd_l2", "extended") == (0.1, 0.2, 0.3, 0.5, 0.7) + paper["pgd_l2"]
    assert all(config.noise_levels(s, "extended") == paper["pgd_linf"] + (0.2, 0.3)
               for s in ("ifgsm_linf", "apgd_ce", "apgd_dlr", "apgd_t", "square", "autoattack", "autoattack_fast"))
    assert config.noise_levels("white", "extended") == paper["white"]
    assert config.parse_config("CE", {}, argv=["--levels", "extended"], training=PAPER_TRAINING).levels == "extended"
    with pytest.raises(ConfigError, match=r"^--levels: unknown level list 'long' \(known: paper, extended\)$"):
        config.parse_config("CE", {}, argv=["--levels", "long"], training=PAPER_TRAINING)


def test_every_sweep_has_its_title_levels_and_one_line_description():
    settings = {"steps": 3, "restarts": 2}
    for name, sweep in config.SWEEPS.items():
        assert sweep.title and sweep.axis and set(sweep.levels) == set(config.LEVEL_LISTS), name
        assert sweep.describe(settings).endswith("early stop, model in eval mode") == sweep.attacks_model, name
    # The autoattack sweep is AutoAttack's standard version, Square's budget scaled from 5000 queries
    # at 100 steps; autoattack_fast the earlier line-up with 1000.
    assert config.SWEEPS["autoattack"].describe(settings) == (
        "AutoAttack standard: APGD-CE, then APGD-T (every other class as a target in turn; 3 steps, 2 random "
        "start(s) each) and Square (150 queries) on the survivors, early stop, model in eval mode")
    assert config.SWEEPS["autoattack_fast"].describe(settings) == (
        "AutoAttack fast: APGD-CE, then APGD-DLR (3 steps, 2 random start(s) each) and Square (30 queries) on the "
        "survivors, early stop, model in eval mode")
    assert config.square_queries(100, "standard") == 5000 and config.square_queries(100) == 1000
    assert {name: sweep.ensemble for name, sweep in config.SWEEPS.items() if sweep.ensemble} == {
        "autoattack": "standard", "autoattack_fast": "fast"}
    assert config.SWEEPS["apgd_dlr"].title == "APGD-DLR, L-inf budget"


def test_a_method_declares_its_whole_number_hyperparameters_and_config_only_the_shared_ones():
    assert config.COUNTS <= set(config.TRAIN_DEFAULTS) | set(config.SCRIPT_SETTINGS)
    for method, script in reproduce.SCRIPTS.items():
        cfg = config.parse_script(script, argv=[])
        assert cfg.method == method == config.method_of(script.__file__)
        assert {key for key in script.HYPERPARAMETERS if type(getattr(cfg, key)) is int} == set(script.WHOLE_NUMBERS)
    with pytest.raises(ConfigError, match="invalid int value: '2.5'"):
        config.parse_script(reproduce.SCRIPTS["advls"], argv=["--pgd_steps", "2.5"])
    with pytest.raises(ConfigError, match=r"^train\.py: not the script of a method of config\.METHODS$"):
        config.method_of("train.py")


def test_the_paper_plans_the_papers_runs_and_the_baselines_add_theirs():
    """Without baselines only the paper's methods run (whatever --methods lists); with them every
    method, and CE also with Gaussian noise (config.BASELINE_GRID) under its own run name."""
    paper = [job.run_dir.name for job in reproduce.plan_jobs("paper", list(config.METHODS))]
    assert paper == ["CE", "NSR_beta1_1_beta2_1", "jacob_beta_44", "advls_eps_0.005_beta_0.5", "advls_eps_0.01_beta_0.5",
                     "advls_eps_0.05_beta_0.5", "advls_eps_0.1_beta_0.5"]
    assert config.PRESETS["paper"].methods == config.PAPER_METHODS
    assert config.PRESETS["baselines"].methods == config.PRESETS["mini"].methods == tuple(config.METHODS)
    both = [job.run_dir.name for job in reproduce.plan_jobs("baselines", list(config.METHODS), baselines=True)]
    assert both == [paper[0], "CE_noise_0.25", *paper[1:], "trades_eps_0.01_beta_6", "fast_adv_eps_0.01_beta_0.5"]
    noisy = reproduce.plan_jobs("baselines", ["CE"], baselines=True)[1]
    assert (noisy.cfg.noise_sd, noisy.varied, noisy.cfg.epochs, noisy.cfg.result_dir) == (0.25, "noise_sd", 70, "result")
    selection = reproduce.plan_jobs("paper-selection", list(config.METHODS), baselines=True)
    assert {job.method for job in selection} == {"NSR", "jacob"}  # the coefficient study stays the paper's
