"""Option values as users pass them to `refreekv.patch`: a value of the
wrong type is a TypeError and one out of range a ValueError, each naming the
option, what it takes and what it got, raised before the model is touched.
No truthy stand-ins ("no" for False), no bools for numbers, no floats for
counts, no NaN for fractions, no bare int for a list of layers."""

from __future__ import annotations

import re

import numpy as np
import pytest
from integration_models import tiny_model

import refreekv


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "sdpa")  # 4 layers


def refused(model, error: type[Exception], message: str, *args, **options) -> str:
    """Patching with `options` raises `error` matching `message`, and the
    model is left as it was; returns the message."""
    implementation = model.config._attn_implementation
    with pytest.raises(error, match=message) as raised:
        refreekv.patch(model, *args, **options)
    assert model.config._attn_implementation == implementation
    assert getattr(model, "_refreekv_handle", None) is None
    return str(raised.value)


# -- every option of every method ----------------------------------------------

# A value of another type than each option's default, as a slip would give it.
WRONG_TYPE = {bool: "no", int: "8", float: "0.5", tuple: 5, str: 3}
EVERY_OPTION = [(method, option) for method, options in refreekv.methods().items() for option in options]


@pytest.mark.parametrize("method, option", EVERY_OPTION, ids=[f"{m}-{o}" for m, o in EVERY_OPTION])
def test_every_option_refuses_a_value_of_another_type(model, method, option):
    wrong = WRONG_TYPE[type(refreekv.methods()[method][option])]
    refused(model, TypeError, rf"^{option} must be .+ got {re.escape(repr(wrong))} of type {type(wrong).__name__}", method, **{option: wrong})


NUMERIC_OPTIONS = [(m, o) for m, o in EVERY_OPTION if type(refreekv.methods()[m][o]) in (int, float)]


@pytest.mark.parametrize("method, option", NUMERIC_OPTIONS, ids=[f"{m}-{o}" for m, o in NUMERIC_OPTIONS])
def test_no_numeric_option_takes_a_bool(model, method, option):
    # True is an int to Python; as a window, budget or threshold it is a slip.
    refused(model, TypeError, rf"^{option} must be .+ got True of type bool", method, **{option: True})


# -- booleans -------------------------------------------------------------------


def test_include_sinks_in_norm_no_is_refused_not_taken_as_true(model):
    refused(model, TypeError, r"^include_sinks_in_norm must be True or False, got 'no' of type str$", include_sinks_in_norm="no")


def test_include_sinks_in_norm_zero_is_refused(model):
    refused(model, TypeError, r"^include_sinks_in_norm must be True or False, got 0 of type int$", include_sinks_in_norm=0)


def test_evict_no_is_refused_not_taken_as_true(model):
    refused(model, TypeError, r"^evict must be True or False, got 'no' of type str$", "snapkv", evict="no")


def test_evict_none_is_refused(model):
    refused(model, TypeError, r"^evict must be True or False, got None of type NoneType$", evict=None)


def test_numpy_bools_are_booleans(model):
    with refreekv.patch(model, "refreekv", include_sinks_in_norm=np.bool_(True), evict=np.False_) as handle:
        assert handle.method.include_sinks_in_norm is True and handle.evict is False


# -- numbers --------------------------------------------------------------------


def test_num_sinks_as_a_float_is_refused(model):
    refused(model, TypeError, r"^num_sinks must be an integer >= 0, got 4.0 of type float$", num_sinks=4.0)


def test_kernel_as_a_float_is_refused(model):
    refused(model, TypeError, r"^kernel must be an odd integer >= 1, got 7.0 of type float$", "coverage", kernel=7.0)


@pytest.mark.parametrize("method, option", [("refreekv", "threshold"), ("coverage", "tolerance")])
def test_nan_tolerances_are_refused(model, method, option):
    refused(model, ValueError, rf"^{option} must be in \[0, 1\), got nan$", method, **{option: float("nan")})


def test_nan_beta_is_refused(model):
    refused(model, ValueError, r"^beta must be a number >= 1, got nan$", "pyramidkv", beta=float("nan"))


def test_nan_budget_is_refused(model):
    refused(model, ValueError, r"^budget as a fraction of the prompt must be in \(0, 1\], got nan$", "snapkv", budget=float("nan"))


def test_a_token_count_written_as_a_float_says_how_to_write_it(model):
    refused(model, ValueError, r"^budget as a fraction of the prompt must be in \(0, 1\], got 512.0 \(for a token count, write 512\)$",
            "h2o", budget=512.0)  # fmt: skip


def test_numpy_numbers_are_numbers(model):
    with refreekv.patch(model, "snapkv", budget=np.int64(64), window=np.int32(4), protected_layers=np.arange(2)) as handle:
        method = handle.method
        assert method.budget == 64 and type(method.budget) is int and type(method.window) is int
        assert method.protected_layers == (0, 1)


# -- window_rows (issue #23: the error named the budget) ------------------------------


def test_window_rows_zero_names_window_rows(model):
    message = refused(model, ValueError, r"^window_rows as a row count must be >= 1, got 0$", window_rows=0)
    assert "budget" not in message


def test_window_rows_above_one_as_a_fraction_names_window_rows(model):
    refused(model, ValueError, r"^window_rows as a fraction of the prompt must be in \(0, 1\], got 1.5$", window_rows=1.5)


# -- choices --------------------------------------------------------------------------


def test_a_choice_of_another_type_is_a_type_error(model):
    refused(model, TypeError, r"^pooling must be 'max' or 'avg', got None of type NoneType$", "snapkv", pooling=None)


def test_a_wrong_choice_lists_the_choices(model):
    refused(model, ValueError, r"^granularity must be 'head' or 'layer', got 'token'$", "coverage", granularity="token")


# -- protected_layers (issue #23: 'int' object is not iterable) ------------------------


def test_protected_layers_as_a_bare_int_says_what_to_write(model):
    refused(model, TypeError, r"^protected_layers must be a sequence of layer indices \(e.g. \(0, 1\), or \(5,\) for layer 5 alone\), "
            r"got 5 of type int$", protected_layers=5)  # fmt: skip


def test_protected_layers_with_a_float_names_the_float(model):
    refused(model, TypeError, r"^protected_layers must be .+, got \[0, 1.5\]: 1.5 not an integer$", protected_layers=[0, 1.5])


def test_protected_layers_past_the_model_say_which_and_the_range(model):
    refused(model, ValueError, r"^protected_layers \[9\] out of range for a model with 4 layers: expected indices from -4 to 3, "
            r"got \(0, 9\)$", protected_layers=(0, 9))  # fmt: skip


# -- the method itself ------------------------------------------------------------------


def test_a_method_that_is_neither_a_name_nor_an_instance(model):
    refused(model, TypeError, r"^method must be a name from refreekv.methods\(\) or a CompressionMethod instance, got 5 of type int$", 5)
