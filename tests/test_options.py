"""The options engine: each option's declared effect, and the rules derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from llm_neo.commands.compare import REPORT_ONLY, SCORING, CompareConfig
from llm_neo.commands.sweep import NOT_SWEEPABLE
from llm_neo.config import CacheTeacherConfig, DistillConfig
from llm_neo.distill_dir import RESUMABLE_CHANGES
from llm_neo.errors import ConfigError
from llm_neo.options import (
    Effect,
    build_config,
    canonical_keys,
    find_option,
    option_aliases,
    option_effect,
    option_help,
    option_names,
    options_with,
    to_dict,
)


def test_the_derived_rules_are_the_hand_written_sets_they_replaced():
    # The literal sets kept by hand before each option declared its effect (issue 19).
    assert set(RESUMABLE_CHANGES) == {
        "resume", "overwrite", "save_every", "log_every", "eval_batch_size", "device", "mlp_chunks",
        "export", "report_to",
    }  # fmt: skip
    assert set(REPORT_ONLY) == {
        "project_tokens", "gpu", "gpus", "utilization", "jobs", "overwrite", "log_every", "device",
        "exact_memory", "probes", "plan_only", "gpu_price",
    }  # fmt: skip
    assert set(SCORING) == {
        "score",
        "category_field",
        "max_new_tokens",
        "lm_eval_tasks",
        "lm_eval_include",
        "lm_eval_limit",
    }
    assert set(NOT_SWEEPABLE) == {"output_dir", "resume", "overwrite"}


def _non_results(cls: type) -> dict[str, Effect]:
    effects = {
        name: option_effect(found[0]) for name in option_names(cls) if (found := find_option(cls, name))
    }
    return {name: effect for name, effect in effects.items() if effect is not Effect.RESULTS}


# Every option that does not change a run's results, with what it changes instead. A new option changes the
# results unless its declaration says otherwise; a reviewer sees any change to these lists here.
DISTILL_NON_RESULTS = {
    "device": Effect.RUNTIME,
    "log_every": Effect.RUNTIME,
    "mlp_chunks": Effect.COST,
    "save_every": Effect.COST,
    "eval_batch_size": Effect.COST,
    "report_to": Effect.COST,
    "export": Effect.COST,
    "output_dir": Effect.PLACE,
    "resume": Effect.EXISTING,
    "overwrite": Effect.EXISTING,
}
COMPARE_NON_RESULTS = {
    "device": Effect.RUNTIME,
    "log_every": Effect.RUNTIME,
    "jobs": Effect.RUNTIME,
    "mlp_chunks": Effect.COST,
    "save_every": Effect.COST,
    "eval_batch_size": Effect.COST,
    "report_to": Effect.COST,
    "output_dir": Effect.PLACE,
    "overwrite": Effect.EXISTING,
    "project_tokens": Effect.REPORT,
    "gpu": Effect.REPORT,
    "gpus": Effect.REPORT,
    "utilization": Effect.REPORT,
    "gpu_price": Effect.REPORT,
    "exact_memory": Effect.REPORT,
    "probes": Effect.REPORT,
    "plan_only": Effect.REPORT,
    "score": Effect.SCORING,
    "category_field": Effect.SCORING,
    "max_new_tokens": Effect.SCORING,
    "lm_eval_tasks": Effect.SCORING,
    "lm_eval_include": Effect.SCORING,
    "lm_eval_limit": Effect.SCORING,
}


@pytest.mark.parametrize(
    ("cls", "expected"), [(DistillConfig, DISTILL_NON_RESULTS), (CompareConfig, COMPARE_NON_RESULTS)]
)
def test_every_option_is_classified_where_it_is_declared(cls, expected):
    assert _non_results(cls) == expected


def test_an_option_without_a_declared_effect_changes_the_results():
    @dataclasses.dataclass
    class Config:
        plain: int = dataclasses.field(default=0, metadata=option_help("Changes the numbers."))
        logging: int = dataclasses.field(default=0, metadata=option_help("Logs.", effect=Effect.RUNTIME))
        bare: int = 0  # no metadata at all

    assert options_with(Config, Effect.RESULTS) == {"plain", "bare"}
    assert options_with(Config, Effect.RUNTIME, Effect.COST) == {"logging"}


def _distill_config(argv: list[str], yaml_text: str | None = None, tmp_path=None) -> DistillConfig:
    from llm_neo.cli import build_parser
    from llm_neo.config import ALIASES

    config_file = None
    if yaml_text is not None:
        config_file = str(tmp_path / "c.yaml")
        (tmp_path / "c.yaml").write_text(yaml_text)
    args = build_parser().parse_args(["distill", *argv])
    return build_config(DistillConfig, args, config_file, vocabulary=ALIASES)


def test_an_alias_flag_and_yaml_key_set_their_option(tmp_path):
    assert _distill_config(["--temperature", "2"]).kd_temperature == 2.0
    assert _distill_config(["--kd-temperature", "3"]).kd_temperature == 3.0
    assert _distill_config([], "temperature: 4\n", tmp_path).kd_temperature == 4.0
    # A flag wins over the YAML file, whichever spelling either uses.
    assert _distill_config(["--kd-temperature", "5"], "temperature: 4\n", tmp_path).kd_temperature == 5.0
    assert _distill_config(["--temperature", "6"], "kd_temperature: 4\n", tmp_path).kd_temperature == 6.0


def test_an_option_given_under_both_its_names_is_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError) as info:
        _distill_config(["--kd-temperature", "2", "--temperature", "3"])
    assert info.value.problems == [
        "--kd-temperature and --temperature are one option (--kd-temperature); give it once"
    ]
    with pytest.raises(ConfigError) as info:
        _distill_config([], "temperature: 2\nkd_temperature: 3\n", tmp_path)
    assert info.value.problems == [
        f"{tmp_path / 'c.yaml'}: temperature and kd_temperature are one option (kd_temperature); give it once"
    ]


def test_help_names_an_alias_on_its_option_line_only(capsys):
    from llm_neo.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    assert "--kd-temperature KD_TEMPERATURE" in text
    lines = [line for line in text.splitlines() if "--temperature" in line]
    assert lines == [line for line in lines if "(alias: --temperature)" in line] and len(lines) == 1


def test_an_old_config_yaml_compares_equal_to_the_config_it_loads_as(tmp_path):
    config = DistillConfig(student="s", data="d", kd_temperature=2.0)
    old = to_dict(config)
    old = {("temperature" if k == "kd_temperature" else k): v for k, v in old.items()}
    assert "kd_temperature" not in old
    assert canonical_keys(DistillConfig, old) == to_dict(config)
    assert option_aliases(DistillConfig) == {"temperature": "kd_temperature"}
    assert option_aliases(CacheTeacherConfig) == {"temperature": "kd_temperature"}
