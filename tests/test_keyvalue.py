from __future__ import annotations

import pytest

from nbhelpers.settings.keyvalue import AssignmentError, check_fields, parse_assignments, parse_value

SCHEMA = {"epochs": 50, "lr": 2e-4, "pretrained": True, "model": "densenet121", "seeds": [0, 1],
          "views": ["PA"], "split": [0.7, 0.1, 0.2], "loss_options": {}}


def test_values_read_as_typed_on_a_command_line():
    assert parse_value("false") is False and parse_value("False") is False and parse_value("TRUE") is True
    assert parse_value("none") == "none"  # text until a schema says the setting holds no text
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3
    assert parse_value("[0, 1]") == [0, 1] and parse_value("['PA']") == ["PA"] and parse_value("(1, 2)") == [1, 2]
    assert parse_value("resnet50") == "resnet50" and parse_value("'a b'") == "a b"
    assert parse_value("{gamma = 2.0}") == {"gamma": 2.0}


def test_booleans_are_never_truthy_text():
    # Before: `--set pretrained=false` reached the trainer as the text "false", and bool("false") is True.
    assert parse_assignments(["pretrained=false"], SCHEMA) == {"pretrained": False}
    assert parse_assignments(["pretrained=false"]) == {"pretrained": False}


def test_schema_converts_where_nothing_is_lost():
    got = parse_assignments(["lr=1", "seeds=0,1,2", "views=PA", "split=[0.5,0.25,0.25]", "model=123",
                             "loss_options={gamma=2}"], SCHEMA)
    assert got == {"lr": 1.0, "seeds": [0, 1, 2], "views": ["PA"], "split": [0.5, 0.25, 0.25], "model": "123",
                   "loss_options": {"gamma": 2}}
    assert isinstance(got["lr"], float)


@pytest.mark.parametrize("item, message", [
    ("epochs=1.5", r"epochs must be an integer, got '1.5'"),
    ("epochs=abc", r"epochs must be an integer, got 'abc'"),
    ("epochs=true", r"epochs must be an integer, got 'true'"),
    ("pretrained=yes", r"pretrained must be true or false, got 'yes'"),
    ("lr=fast", r"lr must be a number, got 'fast'"),
    ("seeds=a,b", r"seeds must be a list of integers, got 'a,b'"),
])
def test_a_wrong_type_names_the_key_the_type_and_the_value(item, message):
    with pytest.raises(AssignmentError, match=message):
        parse_assignments([item], SCHEMA)


def test_none_is_text_for_text_settings_and_no_value_for_others():
    schema = {"scheduler": "step", "min_age": 18.0, "views": ["PA"]}
    assert parse_assignments(["scheduler=none", "min_age=none", "views=none"], schema) == {
        "scheduler": "none", "min_age": None, "views": ["none"]}
    assert parse_assignments(["attention=none"]) == {"attention": "none"}


def test_unknown_keys_and_malformed_items_are_refused():
    with pytest.raises(AssignmentError, match=r"'epochz' is not a known setting; did you mean epochs"):
        parse_assignments(["epochz=3"], SCHEMA)
    with pytest.raises(AssignmentError, match=r"'zzz' is not a known setting; known: epochs"):
        parse_assignments(["zzz=3"], SCHEMA)
    with pytest.raises(AssignmentError, match="KEY=VALUE"):
        parse_assignments(["epochs"], SCHEMA)


def test_typed_values_are_checked_the_same_way():
    assert check_fields({"epochs": 3, "other": "x"}, SCHEMA, "TrainConfig") == {"epochs": 3, "other": "x"}
    with pytest.raises(AssignmentError, match=r"TrainConfig.epochs must be an integer, got 1.5"):
        check_fields({"epochs": 1.5}, SCHEMA, "TrainConfig")
