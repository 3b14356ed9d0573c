"""Settings: one place for presets, flag types declared rather than taken from the defaults."""
import importlib

import pytest

import config
import reproduce

SCRIPTS = ["CPSC2018_CNN_CE", "CPSC2018_CNN_NSR", "CPSC2018_CNN_jacob", "CPSC2018_CNN_ce_adv_pgd_ls"]


def test_editing_a_default_does_not_change_what_its_flag_accepts():
    assert config.parse_config("jacob", {"beta": 44}, argv=["--beta", "0.5"]).beta == 0.5
    assert config.parse_config("CE", {}, argv=["--lr", "1"], training={"lr": 1}).lr == 1.0
    with pytest.raises(config.ConfigError, match="invalid int value"):
        config.parse_config("advls", {"pgd_steps": 20.0}, argv=["--pgd_steps", "2.5"])


def test_the_scripts_show_the_shared_settings_of_the_protocol():
    for name in SCRIPTS:
        training = importlib.import_module(name).TRAINING
        assert training == {key: config.TRAIN_DEFAULTS[key] for key in ("epochs", "batch_size", "lr")}, name


def test_every_preset_setting_belongs_to_a_method_or_the_shared_settings():
    known = set(config.TRAIN_DEFAULTS).union(*(importlib.import_module(n).HYPERPARAMETERS for n in SCRIPTS))
    for name, preset in config.PRESETS.items():
        assert set(preset) <= known, (name, set(preset) - known)


def test_a_preset_means_the_same_through_the_script_and_reproduce():
    jobs = reproduce.plan_jobs(reproduce.PLANS["demo"], list(reproduce.METHOD_SCRIPTS), "data", "result")
    for job in jobs:
        module = importlib.import_module(reproduce.METHOD_SCRIPTS[job.method])
        direct = config.parse_config(job.method, module.HYPERPARAMETERS, ["--preset", "demo"],
                                     training=module.TRAINING)
        for key in module.HYPERPARAMETERS:
            if key != "eps":  # reproduce sweeps the adversarial budget
                assert getattr(job.cfg, key) == getattr(direct, key), (job.method, key)
    jacob = next(job for job in jobs if job.method == "jacob")
    advls = next(job for job in jobs if job.method == "advls")
    assert jacob.cfg.jacobian_projections == 1 and advls.cfg.pgd_steps == 5


def test_level_lists_are_the_papers_by_default_and_extended_on_request():
    paper = {"pgd_linf": (0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1), "pgd_l2": (1, 3, 5, 10, 15, 20, 25, 30),
             "white": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)}
    assert config.parse_config("CE", {}, argv=[]).levels == "paper"
    for sweep, levels in paper.items():
        assert config.noise_levels(sweep) == levels
    assert config.noise_levels("pgd_linf", "extended") == paper["pgd_linf"] + (0.2, 0.3)
    assert config.noise_levels("pgd_l2", "extended") == (0.1, 0.2, 0.3, 0.5, 0.7) + paper["pgd_l2"]
    assert all(config.noise_levels(s, "extended") == paper["pgd_linf"] + (0.2, 0.3)
               for s in ("ifgsm_linf", "apgd_ce", "apgd_dlr", "square", "autoattack"))
    assert config.noise_levels("white", "extended") == paper["white"]
    assert config.parse_config("CE", {}, argv=["--levels", "extended"]).levels == "extended"
    with pytest.raises(config.ConfigError, match=r"^--levels: unknown level list 'long' \(known: paper, extended\)$"):
        config.parse_config("CE", {}, argv=["--levels", "long"])
