"""One typed schema covers every key a run reads: every option of every group passes it as shipped, a key it
does not know is refused, and for every key a wrong type, and for every ranged key an out-of-range value,
is refused in one error naming the key, composed in-process (no subprocess per case)."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_object
from omegaconf import OmegaConf, open_dict

from costlab import CONF_DIR, schema
from costlab.schema import ConfigError, Range, check_config
from tests.conftest import compose_config

GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "experiment" and any(d.glob("*.yaml")))
EXTRA = {"textfile": [f"data.path={CONF_DIR}"]}  # an option whose required key has no default


def _options():
    for group in GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group, name", list(_options()), ids=lambda v: str(v))
def test_every_option_as_shipped_passes_its_schema(group, name):
    check_config(compose_config([f"{group}={name}", *EXTRA.get(name, [])]))


def _fields():
    """(config key, schema Key) for every key of the default config and of every group's options."""
    seen = {}
    for group, name in _options():
        cfg = compose_config([f"{group}={name}", *EXTRA.get(name, [])])
        for section in cfg:
            if section in schema.NOT_USER_KEYS or not OmegaConf.is_dict(cfg[section]):
                continue
            keys = schema.schema_of(str(section), cfg[section])
            for k in cfg[section]:
                if k not in ("_target_", "name"):
                    seen.setdefault(f"{section}.{k}", (keys[k], [f"{group}={name}", *EXTRA.get(name, [])]))
    return seen


FIELDS = _fields()


def test_every_number_has_a_range():
    """A new numeric key without a range fails here: the schema says what it accepts, not only its type."""
    levers = ("pruning.", "quantization.")  # their ranges live in their classes' check methods
    numeric = {k for k, (f, _) in FIELDS.items() if not k.startswith(levers) and _is_numeric(f.type)}
    assert len(numeric) > 40
    assert not sorted(k for k in numeric if FIELDS[k][0].check is None)


def _is_numeric(hint) -> bool:
    args = typing.get_args(hint) or (hint,)
    return any(a in (int, float) or typing.get_origin(a) in (tuple, list, dict) and _is_numeric(a) for a in args)


def _wrong_type(hint):
    """A value of the wrong type for ``hint`` (a string for numbers and booleans, a number for strings)."""
    args = set(typing.get_args(hint)) or {hint}
    if args & {int, float, bool} or any(typing.get_origin(a) in (list, tuple, dict) for a in args):
        return "'many'"
    return "[1, 2]" if str in args or typing.get_origin(hint) is None else "'many'"


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_a_wrong_type_is_refused_naming_the_key(key):
    field, base = FIELDS[key]
    if field.type is typing.Any:
        pytest.skip("checked by its option's own check method")
    with pytest.raises(ConfigError) as e:
        check_config(_overridden(base, f"{key}={_wrong_type(field.type)}"))
    assert e.value.key == key, e.value


def _overridden(base: list[str], override: str):
    """``base`` composed, then ``override`` parsed and applied as Hydra applies one to a key the config has
    (``OmegaConf.update``, merging): what ``compose_config([*base, override])`` gives, without composing the
    YAML again for each key."""
    cfg = compose_config(base)
    parsed = OverridesParser.create().parse_overrides([override])[0]
    with open_dict(cfg):
        OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), merge=True)
    return cfg


def test_an_override_applied_to_a_composed_config_is_what_hydra_composes():
    """:func:`_overridden` stands for a composition, checked on a value of each kind the tests give."""
    for override in ("trainer.max_steps='many'", "model.n_layer=[1, 2]", "serve.prompt_len='many'",
                     "serve.prompt_len=[1, 2]", "tracking.run_name=[1, 2]"):
        assert _overridden([], override) == compose_config([override]), override


def _out_of_range(check):
    if isinstance(check, Range):
        return check.lo - 1 if check.lo is not None else check.hi + 1
    if hasattr(check, "choices"):
        return "nonsense"
    if check is schema.degree:
        return 0
    if check is schema.non_empty:
        return "' '"
    raise AssertionError(f"no out-of-range value known for {check}")


@pytest.mark.parametrize("key", sorted(k for k, (f, _) in FIELDS.items() if f.check is not None))
def test_an_out_of_range_value_is_refused_naming_the_key(key):
    field, base = FIELDS[key]
    cfg = compose_config(base)
    with open_dict(cfg):
        section, _, name = key.partition(".")
        bad = _out_of_range(field.check)
        bad = bad.strip("'") if isinstance(bad, str) else bad
        current = cfg[section][name]
        cfg[section][name] = [bad] * len(current) if OmegaConf.is_list(current) else bad
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert e.value.key == key, e.value


def test_a_key_no_schema_has_is_refused():
    with pytest.raises(ConfigError, match=r"^trainer.max_stepz=3: no such key in trainer"):
        check_config(compose_config(["+trainer.max_stepz=3"]))
    with pytest.raises(ConfigError, match=r"^model.depth=3: no such key in model=gpt_nano"):
        check_config(compose_config(["+model.depth=3"]))


@pytest.mark.parametrize("target, cls", sorted(schema.TARGETS.items()))
def test_each_option_schema_is_what_its_target_takes(target, cls):
    """The dataclass of a ``_target_`` option names only what the target accepts, with the same types."""
    params = dict(inspect.signature(get_object(target)).parameters)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # GPT(**kwargs) takes GPTConfig's fields
        from costlab.models.gpt import GPTConfig

        params = {f.name: f for f in dataclasses.fields(GPTConfig)}
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    assert set(fields) <= set(params), set(fields) - set(params)


def test_a_refusal_from_the_schema_reaches_the_user_as_one_line(cli):
    """The real path once: run.py refuses a wrong type before any rank starts, in one line, exit 2, no run."""
    before = len(cli.runs())
    proc = cli("trainer.betas=[0.9,1.5]", timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("costlab: error:")]
    assert errors == ["costlab: error: trainer.betas=[0.9, 1.5]: must be in [0, 1)"], proc.stderr
    assert "Traceback" not in proc.stderr and len(cli.runs()) == before
