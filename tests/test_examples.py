"""The shipped example configs and `posttrain config`'s listings hold to the config classes: every example
loads under its command, an example that says it is a listing is exactly that listing, every default it
names is the class's, and every listing holds every key once with its true default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import ALIASES, COMMANDS, _apply_aliases, build_config, load_config
from posttrain.config_reference import reference_yaml, yaml_value

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
# An example that says it is `posttrain config COMMAND examples/NAME.yaml` must be that output.
LISTING = re.compile(r"`posttrain config (\w+) (examples/[\w.-]+\.yaml)`")
DEFAULT_NOTE = re.compile(r"^(\w+): .*#.*\(default: (.*)\)$")


def _command(path: Path) -> str:
    """The command the example is for: its `stage:` key, else the first word after `posttrain` in its header."""
    stage = (yaml.safe_load(path.read_text()) or {}).get("stage")
    if stage:
        return stage
    return re.search(r"posttrain (\w+)", path.read_text()).group(1)


def _header(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))


def test_every_example_is_found():
    assert len(EXAMPLES) >= 11
    listings = {path.name for path in EXAMPLES if LISTING.search(_header(path))}
    assert {"sft_full.yaml", "serve.yaml"} <= listings


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_loads(path):
    command = _command(path)
    assert command in COMMANDS, f"{path.name}: no command {command!r}"
    config = load_config(command, str(path))
    assert config.model_dump()  # validated: every key known, every value allowed


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_an_example_that_is_a_listing_is_exactly_the_listing(path):
    found = LISTING.search(_header(path))
    if found is None:
        assert "every key" not in _header(path).lower(), f"{path.name} claims every key but is no listing"
        return
    command, named = found.groups()
    assert named == f"examples/{path.name}" and command == _command(path)
    assert path.read_text() == reference_yaml(command, str(path)), (
        f"{path.name} is out of date: posttrain config {command} {named} > /tmp/x.yaml && mv /tmp/x.yaml {named}")


def test_every_default_an_example_names_is_the_default():
    checked = 0
    for path in EXAMPLES:
        cls = COMMANDS[_command(path)]
        for line in path.read_text().splitlines():
            note = DEFAULT_NOTE.match(line)
            if note:
                key, default = note.group(1), yaml.safe_load(note.group(2))
                field = cls.model_fields[key]
                assert default == field.get_default(call_default_factory=True), f"{path.name}: {line}"
                checked += 1
    assert checked >= 9  # sft_full.yaml and serve.yaml name the default of every value they change


# A config of each command with only its required keys (and, for RL, a reward) set.
def _least(command: str) -> dict:
    cls = COMMANDS[command]
    least = {key: "x" for key, field in cls.model_fields.items() if field.is_required()}
    return least | ({"reward_funcs": ["exact_match"]} if command in ("ppo", "grpo") else {})


@pytest.mark.parametrize("command", COMMANDS)
def test_a_listing_holds_every_key_once_with_its_default(command, tmp_path):
    text = reference_yaml(command)
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert sorted(keys) == sorted(COMMANDS[command].model_fields)  # each once; comments on every line
    assert all("  # " in line for line in text.splitlines() if line and not line.startswith("#"))
    listing = tmp_path / "listing.yaml"
    listing.write_text(text)
    least = _least(command)
    loaded = load_config(command, str(listing), [f"{key}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                                 for key, v in least.items()])
    assert loaded.model_dump() == build_config(COMMANDS[command], least).model_dump()


RESOLVED = {  # defaults that follow from other keys: (command, overrides) -> the values they resolve to
    ("sft", ("finetuning_type=qlora",)): {"quantization_bit": 4},
    ("ppo", ()): {"advantage_estimator": "gae", "num_generations": 1, "use_kl_loss": False, "kl_estimator": "k1",
                  "whiten_advantages": True, "loss_agg_mode": "token_mean"},
    ("grpo", ()): {"advantage_estimator": "grpo", "num_generations": 4, "use_kl_loss": True, "kl_estimator": "k3",
                   "whiten_advantages": False, "loss_agg_mode": "token_mean"},
    ("grpo", ("advantage_estimator=dr_grpo", "use_kl_loss=false")): {
        "num_generations": 4, "kl_estimator": "k1", "loss_agg_mode": "seq_mean_token_sum_norm"},
    ("ppo", ("advantage_estimator=rloo", "num_generations=null", "kl_estimator=k2")): {
        "num_generations": 4, "use_kl_loss": False, "kl_estimator": "k2", "whiten_advantages": False},
}


@pytest.mark.parametrize("command, given", list(RESOLVED), ids=[f"{c}-{len(g)}" for c, g in RESOLVED])
def test_a_default_resolved_from_other_keys_is_the_configs_own_value(command, given):
    """What runs is what the config holds, what `posttrain config` lists and what posttrain_config.yaml keeps."""
    overrides = [f"{key}={yaml.safe_dump(v, default_flow_style=True).strip()}" for key, v in _least(command).items()]
    overrides += list(given)
    config, resolved = load_config(command, None, overrides), RESOLVED[command, given]
    assert {key: getattr(config, key) for key in resolved} == resolved
    listing = reference_yaml(command, None, overrides)
    for key, value in resolved.items():
        assert re.search(rf"^{key}: {re.escape(yaml_value(value))} +# ", listing, re.M), key
    saved = build_config(COMMANDS[command], config.model_dump(mode="json"))
    assert saved.model_dump() == config.model_dump()


def test_a_listing_with_values_names_the_defaults_they_replace(tmp_path):
    text = reference_yaml("dpo", None, ["model_name_or_path=m", "dataset=d", "output_dir=o", "beta=0.3"])
    assert re.search(r"^pref_beta: 0\.3 +# .*\(alias beta\) \(default: 0\.1\)$", text, re.M)
    assert re.search(r"^pref_loss: sigmoid +# .*\(alias loss_type\)$", text, re.M)  # the default: no note
    assert re.search(r"^model_name_or_path: m +# required: ", text, re.M)
    assert text.startswith("# posttrain dpo: every key")


def test_config_command_prints_the_listing(capsys):
    assert main(["config", "serve"]) == 0
    assert capsys.readouterr().out == reference_yaml("serve")
    assert main(["config", "serve", "port=1", "model=m"]) == 0
    assert "port: 1 " in capsys.readouterr().out
    assert main(["config", "sft", "lora_rank=0"]) == 2
    assert "lora_rank" in capsys.readouterr().err


def test_every_alias_maps_straight_to_a_key_of_its_command():
    assert set(ALIASES) == set(COMMANDS)  # the one table names every command
    for command, aliases in ALIASES.items():
        fields = COMMANDS[command].model_fields
        for alias, key in aliases.items():
            assert key in fields, f"{command}: alias {alias!r} names {key!r}, which {command} has no key for"
            assert alias not in fields, f"{command}: {alias!r} is both a key and an alias"
            assert key not in aliases, f"{command}: alias {alias!r} names {key!r}, itself an alias (a chain)"
            assert _apply_aliases({alias: 1}, command) == {key: 1}
