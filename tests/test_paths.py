"""`diffenv.paths.safe_name`: every name that becomes a file or folder name is one path component."""

from __future__ import annotations

import pytest

from diffenv.paths import safe_name


@pytest.mark.parametrize("name", ["eps-classifier-10", "grpo", "seed0", "a.b", "..x", "x..", "Ünïcode name"])
def test_plain_names_pass(name):
    assert safe_name(name, "task name") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "../../../x", "a/b", "/abs", "/", "a\\b", "..\\x", "x\0y"])
def test_separators_dots_and_empty_are_refused(name):
    with pytest.raises(ValueError, match=r"^task name=.*: expected a non-empty name without '/', '\\' or NUL") as e:
        safe_name(name, "task name")
    assert repr(name) in str(e.value)  # the message names the key, the value and the expectation


@pytest.mark.parametrize("value", [None, 3, b"x", ["x"]])
def test_non_strings_are_refused(value):
    with pytest.raises(ValueError, match="expected a non-empty name") as e:
        safe_name(value, "algo")
    assert str(e.value).startswith(f"algo={value!r} is a {type(value).__name__};")


def test_embedded_model_name_is_not_a_path():
    from diffenv.models.embedded import EmbeddedDigitsBackend

    with pytest.raises(ValueError, match=r"model='\.\./\.\./rewards/weights'"):
        EmbeddedDigitsBackend("../../rewards/weights")
